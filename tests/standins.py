"""Stand-ins at the boundaries that cannot exist here (a GPU, NVML), and an engine wrapper.

Each is a small real implementation of the service's own protocol; the code around it runs for real.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from PIL import Image

from app.engines.base import OCREngine, PageText, RecognizeOptions
from app.engines.gpu import GpuMemory
from app.errors import EngineError

MIB = 1024 * 1024


class StandInGpu:
    """A GPU whose free memory the test sets; implements ``GpuProbe``."""

    def __init__(self, total_bytes: int = 16 * 1024 * MIB) -> None:
        self.total_bytes = total_bytes
        self.free_bytes = total_bytes

    def memory(self) -> GpuMemory | None:
        free = self.free_bytes
        return GpuMemory(0, self.total_bytes, self.total_bytes - free, free)


class InstrumentedEngine:
    """Wraps a real engine: counts calls, can slow pages down or fail the n-th call."""

    def __init__(self, inner: OCREngine, *, page_delay: float = 0.0, fail_on_call: int | None = None) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.max_batch_size = inner.max_batch_size
        self.page_delay = page_delay
        self.fail_on_call = fail_on_call
        self.calls = 0
        self._lock = threading.Lock()
        self._model_ref: weakref.ref[Any] | None = None

    def load(self) -> None:
        self.inner.load()
        self._model_ref = weakref.ref(self.inner._model)  # type: ignore[attr-defined]

    def unload(self) -> None:
        self.inner.unload()

    def loaded_model(self) -> Any:
        """The model object if anything still references it (``None`` once memory is released)."""
        return self._model_ref() if self._model_ref is not None else None

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        with self._lock:
            self.calls += 1
            call = self.calls
        if call == self.fail_on_call:
            raise EngineError("stand-in failure")
        time.sleep(self.page_delay * len(images))
        return self.inner.recognize(images, options)
