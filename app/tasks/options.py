"""From a task's options to what the engine runs: the prompt and the image sizes."""

from __future__ import annotations

from dataclasses import dataclass

from app.engines.base import RecognizeOptions
from app.records import TaskOptions

MODE_PROMPTS = {
    "document": "<|grounding|>Convert the document to markdown.",
    "free": "Free OCR.",
    "figure": "Parse the figure.",
    "describe": "Describe this image in detail.",
}

# The model's published size modes: (base_size, image_size, crop_mode). OCR-2 always uses a 1024 px
# global view with 768 px tiles, so for it only crop_mode matters.
RESOLUTIONS = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}


@dataclass(frozen=True)
class EngineDefaults:
    """The service-wide defaults a task's options override."""

    prompt_override: str | None
    base_size: int
    image_size: int
    crop_mode: bool
    max_new_tokens: int
    timeout_seconds: float


def recognize_options(options: TaskOptions, defaults: EngineDefaults) -> RecognizeOptions:
    """Resolve a task's options: explicit sizes beat ``resolution``, which beats the defaults."""
    base_size, image_size, crop_mode = defaults.base_size, defaults.image_size, defaults.crop_mode
    if options.resolution is not None:
        base_size, image_size, crop_mode = RESOLUTIONS[options.resolution]
    prompt = options.prompt or defaults.prompt_override or MODE_PROMPTS[options.mode]
    return RecognizeOptions(
        prompt=prompt,
        base_size=options.base_size or base_size,
        image_size=options.image_size or image_size,
        crop_mode=crop_mode if options.crop_mode is None else options.crop_mode,
        max_new_tokens=defaults.max_new_tokens,
        timeout_seconds=defaults.timeout_seconds,
    )
