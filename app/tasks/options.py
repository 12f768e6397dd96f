"""From a task's options to what the engine runs: the prompt and the image sizes, and the retry
ladder a suspect page climbs (``ladder``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.engines.base import RecognizeOptions
from app.pipeline.quality import REASONS
from app.pipeline.run import Rung
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


# The stricter n-gram guard of the first rung. The hf engine's guard (APP_DS_NO_REPEAT_NGRAM_SIZE,
# 20) bans a repeated 20-token n-gram anywhere in the page, and the vLLM recipe's bans a repeated
# 30-token n-gram within 90 tokens, so a loop whose unit is longer than 60 tokens escapes it (the
# processor's rule; see app.engines.vllm.ngram_args). 12 tokens in 512 catches units of up to 500
# tokens and shorter near-repeats; too strict for every page (a form's repeated labels), which is
# why it is a rung and not the default. Engines only ever make their guard stricter with it.
STRICT_NGRAM_SIZE = 12  # tokens
STRICT_NGRAM_WINDOW = 512  # tokens
# The token cap of the third rung, as a share of APP_DS_MAX_NEW_TOKENS: a runaway spends the whole
# cap repeating itself, so a page that ran away usually holds its real text well inside a quarter
# of it (2048 of 8192 tokens), and an attempt cut there before the loop ranks above the runaway.
TOKEN_CAP_SHARE = 4

_LOOPS = frozenset({"no_end_marker", "repeating_tail"})
_ANYTHING = frozenset(REASONS)


def ladder(options: TaskOptions, defaults: EngineDefaults) -> list[Rung]:
    """The attempts a page may get: rung 0 is the task's own options (``recognize_options``), then
    the retry rungs, each changing what is likely to help a page that came back suspect
    (``app.pipeline.quality``):

    1. a stricter no-repeat guard (``STRICT_NGRAM_SIZE`` in ``STRICT_NGRAM_WINDOW``): against the
       repetition loop, the commonest failure (DeepSeek-OCR #151), and a page that never ended;
    2. the other resolution mode, tiles on or off (gundam <-> base): another view of the page, for
       any reason (an empty page, text that disagrees with the PDF, a loop);
    3. a token cap of ``1 / TOKEN_CAP_SHARE`` of the page's: a loop that survives the guard stops
       early, and what came before it ranks above a runaway;
    4. the ``free`` prompt (document mode with its own prompt only; a mode or a prompt of the
       user's own is kept): plain text without layout, the last resort of a page that stays empty
       or loops in the grounded format.

    Rungs 2-4 keep the stricter guard of rung 1. Each rung lists the reasons it ``remedies``; the
    pipeline climbs, up to ``APP_PAGE_RETRIES`` times, only to rungs that remedy what the best
    attempt so far is suspect of. Rungs that make no sense are left out (the free prompt outside
    document mode, a token cap of nothing), and rung numbers follow this list: they name the raw
    files (``pNNNN.rK.json``) a resumed task reads back.
    """
    first = recognize_options(options, defaults)
    strict = replace(first, no_repeat_ngram_size=STRICT_NGRAM_SIZE, ngram_window=STRICT_NGRAM_WINDOW)
    base_size, image_size, crop_mode = RESOLUTIONS["base" if first.crop_mode else "gundam"]
    rungs = [
        Rung(first, _ANYTHING),
        Rung(strict, _LOOPS),
        Rung(replace(strict, base_size=base_size, image_size=image_size, crop_mode=crop_mode), _ANYTHING),
    ]
    cap = first.max_new_tokens // TOKEN_CAP_SHARE
    if cap >= 1:
        rungs.append(Rung(replace(strict, token_limit=cap), _LOOPS))
    if options.mode == "document" and first.prompt == MODE_PROMPTS["document"]:
        remedies = frozenset({"no_end_marker", "repeating_tail", "empty_output", "low_agreement"})
        rungs.append(Rung(replace(strict, prompt=MODE_PROMPTS["free"]), remedies))
    return rungs
