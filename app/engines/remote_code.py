"""The engine for DeepSeek-OCR v1 (and the official OCR-2 repo) through the checkpoint's own code.

The published code (``deepseek-ai/DeepSeek-OCR``) is loaded with ``trust_remote_code`` and driven
through its ``infer()``, one page per call. It was written for transformers 4.46: it imports
``LlamaFlashAttention2``, which transformers 4.48 removed, and it calls ``.cuda()`` inside
``infer()``. Where either does not hold, ``load()`` fails with a message naming what works instead.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from app.engines.base import END_MARKER, OCREngine, PageText, RecognizeOptions, StopReason
from app.engines.resolve import OCR2_NATIVE_MODEL, V1_MAX_TRANSFORMERS
from app.engines.torch_support import (
    IMAGE_TOKEN,
    flash_attention_usable,
    load_failure,
    release_memory,
    torch_dtype,
)
from app.errors import EngineError, ModelUnavailable

logger = logging.getLogger(__name__)

_ALTERNATIVES = f"on this machine use {OCR2_NATIVE_MODEL} (unset APP_DS_MODEL_PATH) or APP_BACKEND=vllm"
# from_pretrained's keyword for the weights' dtype: `torch_dtype` until 4.56 (the v1 era), `dtype` since.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class RemoteCodeEngine(OCREngine):
    """DeepSeek-OCR v1 through its remote code's ``infer(..., eval_mode=True)``, one page per call.

    ``requires_cuda``: the published ``infer()`` calls ``.cuda()`` itself, so by default ``load()``
    refuses any other device; a checkpoint whose code does not (a CPU port, the test stand-in) may
    lift it. ``infer()`` fixes its own generation settings (8192 new tokens, its n-gram guard), so
    ``options.max_new_tokens`` cannot be applied; ``options.timeout_seconds`` is, through the model's
    ``generation_config.max_time``, which ``generate()`` reads for every setting ``infer()`` leaves out.
    """

    max_batch_size = 1

    def __init__(
        self, model_path: str, *, device: str, dtype: str, use_flash_attn: bool, requires_cuda: bool = True
    ) -> None:
        self.model_name = model_path
        self._device = device
        self._dtype = torch_dtype(dtype, device)
        self._use_flash_attn = use_flash_attn
        self._requires_cuda = requires_cuda
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> None:
        """Import the checkpoint's code, load tokenizer and weights (target dtype) onto the device.

        No-op when loaded. Raises ``ModelUnavailable`` when the device is not CUDA (unless
        ``requires_cuda`` is off), when the code cannot be imported by this transformers, or when the
        checkpoint is missing; ``EngineError`` when it cannot be placed on the device.
        """
        if self._model is not None:
            return
        if self._requires_cuda and not self._device.startswith("cuda"):
            raise ModelUnavailable(
                f"{self.model_name}'s remote code runs only on CUDA (its infer() calls .cuda()), and this "
                f"service runs on {self._device}; {_ALTERNATIVES}"
            )
        load_args: dict[str, Any] = {
            "trust_remote_code": True,
            "use_safetensors": True,
            _DTYPE_KWARG: self._dtype,
        }
        if flash_attention_usable(self._device, self._use_flash_attn):
            load_args["_attn_implementation"] = "flash_attention_2"  # the spelling the published code reads
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name, trust_remote_code=True)
            model = AutoModel.from_pretrained(self.model_name, **load_args)
        except (ImportError, AttributeError) as exc:
            # The published code imports names (LlamaFlashAttention2) that transformers 4.48 removed.
            raise ModelUnavailable(
                f"{self.model_name}'s remote code cannot be imported: it needs transformers < "
                f"{V1_MAX_TRANSFORMERS} (found {transformers.__version__}): {exc}; {_ALTERNATIVES}"
            ) from exc
        except Exception as exc:
            raise load_failure(self.model_name, exc) from exc
        if not callable(getattr(model, "infer", None)):
            raise ModelUnavailable(
                f"{self.model_name}'s remote code has no infer(); it is no DeepSeek-OCR checkpoint"
            )
        try:
            model = model.eval().to(self._device)  # already in the target dtype: no float32 copy on the GPU
        except Exception as exc:  # out of memory, or a device this torch build lacks
            del model
            release_memory(self._device)
            raise EngineError(f"cannot move {self.model_name} to {self._device}: {exc}") from exc
        self._model, self._tokenizer = model, tokenizer
        logger.info("loaded %s (remote code) on %s (%s)", self.model_name, self._device, self._dtype)

    def unload(self) -> None:
        """Drop every reference to the model and tokenizer and give their memory back; idempotent."""
        self._model = None
        self._tokenizer = None
        release_memory(self._device)

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        """Run ``infer()`` on each image (at most one); one ``PageText`` per image.

        ``infer()`` strips the end marker and returns no token count, so a returned text counts as
        finished (``tokens`` 0) unless the call lasted the whole time cap; the pipeline's
        repeated-tail detector still catches a page that ran to infer()'s own token cap.
        Raises ``EngineError`` when not loaded, on a larger batch, when ``infer()`` fails or returns
        no text.
        """
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            raise EngineError(f"{self.model_name} is not loaded")
        if len(images) > self.max_batch_size:
            raise EngineError(f"{len(images)} pages passed; this engine takes at most {self.max_batch_size}")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.max_time = options.timeout_seconds
        # infer() reads the page from a file and insists on an output directory, even with
        # save_results=False; both live only for this call.
        with tempfile.TemporaryDirectory(prefix="dsocr-infer-") as workdir:
            return [self._infer(model, tokenizer, image, options, Path(workdir)) for image in images]

    def _infer(
        self, model: Any, tokenizer: Any, image: Image.Image, options: RecognizeOptions, workdir: Path
    ) -> PageText:
        image_file = workdir / "page.png"
        started = time.monotonic()
        try:
            image.save(image_file)
            text = model.infer(
                tokenizer,
                prompt=f"{IMAGE_TOKEN}\n{options.prompt}",
                image_file=str(image_file),
                output_path=str(workdir),
                base_size=options.base_size,
                image_size=options.image_size,
                crop_mode=options.crop_mode,
                save_results=False,
                test_compress=False,
                eval_mode=True,  # without it infer() prints the text and returns None
            )
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"out of GPU memory on a page: {exc}") from exc
        except Exception as exc:
            # Anything the remote code, torch or transformers raise mid-inference is this engine's failure.
            raise EngineError(f"{self.model_name}'s infer() failed: {exc}") from exc
        if not isinstance(text, str):
            raise EngineError(
                f"{self.model_name}'s infer() returned {type(text).__name__}, not text, with eval_mode=True; "
                "its remote code does not follow DeepSeek-OCR's published infer()"
            )
        stop: StopReason = "eos"
        if not text.endswith(END_MARKER) and time.monotonic() - started >= options.timeout_seconds:
            stop = "timeout"
        return PageText(text=text, stop_reason=stop, tokens=0)
