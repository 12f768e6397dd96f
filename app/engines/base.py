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
    """How to run the model on a batch of pages."""

    prompt: str  # text after the image token, e.g. "<|grounding|>Convert the document to markdown."
    base_size: int  # px, global view (v1; OCR-2 always uses 1024)
    image_size: int  # px, tile size (v1; OCR-2 tiles at 768)
    crop_mode: bool  # tile large pages
    max_new_tokens: int  # token cap per page
    timeout_seconds: float  # wall-time cap per generate() call


@dataclass(frozen=True)
class PageText:
    """The model's output for one page.

    ``text`` is verbatim (grounding tags kept), ending with ``END_MARKER`` when the model finished.
    """

    text: str
    stop_reason: StopReason
    tokens: int  # generated tokens, 0 when the engine cannot tell

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
