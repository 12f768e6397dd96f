"""The interface every OCR engine implements.

An engine only turns page images and a prompt into the model's raw text: it knows nothing of
tasks, files or HTTP. ``OCREngine`` is the blocking, batching kind (transformers), run by callers
in a worker thread; ``async_base.ConcurrentEngine`` is the one-request-per-page kind (vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from PIL import Image

END_MARKER = "<｜end▁of▁sentence｜>"
"""DeepSeek's end-of-sentence token (full-width bars); a page without it never finished."""

StopReason = Literal["eos", "max_tokens", "timeout"]


@dataclass(frozen=True)
class RecognizeOptions:
    """How to run the model on a batch of pages.

    The last three fields are what a retry rung (``app.tasks.options.ladder``) changes; ``None``
    leaves each engine's own setting. The n-gram guard they set is never weaker than the engine's
    own: an engine takes the smaller ``no_repeat_ngram_size`` and the larger ``ngram_window``.
    """

    prompt: str  # text after the image token, e.g. "<|grounding|>Convert the document to markdown."
    base_size: int  # px, global view (v1; OCR-2 always uses 1024)
    image_size: int  # px, tile size (v1; OCR-2 tiles at 768)
    crop_mode: bool  # tile large pages
    max_new_tokens: int  # token cap per page
    timeout_seconds: float  # wall-time cap per generate() call
    # tokens: an n-gram of this many tokens may not repeat (hf: anywhere in the sequence; vllm:
    # within ``ngram_window``), the DeepSeek-OCR recipe's guard against repetition loops
    no_repeat_ngram_size: int | None = None
    ngram_window: int | None = None  # tokens the vllm guard looks back over (the recipe's 90)
    # tokens: a cap below every other (max_new_tokens, the vllm engines' own), which every engine
    # that counts tokens honours
    token_limit: int | None = None


@dataclass(frozen=True)
class PageText:
    """The model's output for one page.

    ``text`` is verbatim (grounding tags kept), ending with ``END_MARKER`` when the model finished.
    """

    text: str
    stop_reason: StopReason
    tokens: int  # generated tokens, 0 when the engine cannot tell
    prompt_tokens: int = 0  # the prompt's tokens (image and instruction), 0 when the engine cannot tell

    @property
    def finished(self) -> bool:
        return self.stop_reason == "eos"


class OCREngine(Protocol):
    """A loaded-on-demand OCR model.

    ``load`` and ``unload`` are idempotent. ``recognize`` is only called between them, takes at most
    ``max_batch_size`` images and returns one ``PageText`` per image, in order. Failures raise
    ``EngineError`` (or ``ModelUnavailable`` when the model cannot be found or run here).
    """

    model_name: str  # the checkpoint in use, as shown in /readyz
    max_batch_size: int

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]: ...
