"""The transformers engine for DeepSeek-OCR-2 in transformers' native classes.

``HFEngine`` runs checkpoints of the ``deepseek_ocr2`` family (``AutoModelForImageTextToText`` +
``AutoProcessor``) on CPU or GPU and batches pages into one ``generate()`` call. DeepSeek-OCR v1's
remote code lives in ``remote_code.py``; ``factory.build_engine`` picks between them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList

from app.engines.base import OCREngine, PageText, RecognizeOptions, StopReason
from app.engines.torch_support import (
    IMAGE_TOKEN,
    flash_attention_usable,
    load_failure,
    release_memory,
    torch_dtype,
)
from app.errors import EngineError, ModelUnavailable

logger = logging.getLogger(__name__)


class HFEngine(OCREngine):
    """DeepSeek-OCR-2 through transformers' native ``deepseek_ocr2`` classes (transformers >= 5.11).

    ``recognize`` runs up to ``batch_size`` pages in one left-padded ``generate()`` call, greedy,
    capped by ``max_new_tokens`` tokens per page (``options.token_limit`` lowers it) and
    ``timeout_seconds`` per call, with the model's no-repeat n-gram guard when
    ``no_repeat_ngram_size`` > 0 (``options.no_repeat_ngram_size`` makes it stricter, or turns it
    on). Each ``PageText`` counts its row's prompt tokens (``prompt_tokens``), padding left out.
    ``options.base_size`` and ``options.image_size`` do not apply: OCR-2's geometry is fixed (global
    view 1024 px, tiles 768 px).
    ``logits_processors`` is a test hook: a factory called once per ``generate()`` call whose
    processors run after the built-in ones (production passes ``None``).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str,
        dtype: str,
        use_flash_attn: bool,
        batch_size: int,
        no_repeat_ngram_size: int,
        logits_processors: Callable[[], list[LogitsProcessor]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model_name = model_path
        self.max_batch_size = batch_size
        self._device = device
        self._dtype = torch_dtype(dtype, device)
        self._use_flash_attn = use_flash_attn
        self._no_repeat_ngram_size = no_repeat_ngram_size
        self._logits_processors = logits_processors
        self._model: Any = None
        self._processor: Any = None
        # Encoding with padding reconfigures a fast tokenizer (Rust, borrowed mutably), and another
        # thread decoding meanwhile fails with "Already borrowed" (huggingface/tokenizers#537):
        # ``prepare`` and ``generate`` may run at once, so their tokenizer calls take turns.
        self._tokenizer_lock = threading.Lock()

    def load(self) -> None:
        """Load processor and weights, in the target dtype, onto the device; no-op when loaded.

        Raises ``ModelUnavailable`` when the checkpoint is missing, unreadable or needs another
        transformers, ``EngineError`` when it cannot be placed on the device (out of memory).
        """
        if self._model is not None:
            return
        model_class = getattr(transformers, "DeepseekOcr2ForConditionalGeneration", None)
        if model_class is None:
            raise ModelUnavailable(
                f"{self.model_name} is a DeepSeek-OCR-2 checkpoint in transformers' native format, which "
                f"needs transformers >= 5.11 (found {transformers.__version__}); upgrade transformers or "
                "use APP_BACKEND=vllm"
            )
        # DeepSeek-OCR-2's native classes declare no flash-attention support (transformers 5.23), and
        # asking for it anyway is an error; sdpa is their fast path.
        flash = (
            flash_attention_usable(self._device, self._use_flash_attn) and model_class._supports_flash_attn
        )
        attention = "flash_attention_2" if flash else "sdpa"
        try:
            processor = AutoProcessor.from_pretrained(self.model_name)
            # Weights are materialised in the target dtype on the CPU, then moved: moving float32
            # weights to the GPU and casting there would double the peak GPU memory.
            # Looked up here, not imported: this module also serves v1 images (transformers 4.46).
            model: Any = transformers.AutoModelForImageTextToText.from_pretrained(
                self.model_name, dtype=self._dtype, attn_implementation=attention
            )
        except Exception as exc:
            raise load_failure(self.model_name, exc) from exc
        try:
            model = model.to(self._device).eval()
        except Exception as exc:  # out of memory, or a device this torch build lacks
            del model
            release_memory(self._device)
            raise EngineError(f"cannot move {self.model_name} to {self._device}: {exc}") from exc
        # Batched generate() appends new tokens on the right, so prompts must be padded on the left,
        # whatever the checkpoint's tokenizer defaults to.
        processor.tokenizer.padding_side = "left"
        self._model, self._processor = model, processor
        logger.info(
            "loaded %s on %s (%s, attention %s)", self.model_name, self._device, self._dtype, attention
        )

    def unload(self) -> None:
        """Drop every reference to the model and processor and give their memory back; idempotent."""
        self._model = None
        self._processor = None
        release_memory(self._device)

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        """One ``generate()`` call over ``images``; one ``PageText`` per image, in order.

        Raises ``EngineError`` when the engine is not loaded, the batch is too large, or
        preprocessing or generation fails.
        """
        return self.generate(self.prepare(images, options))

    def prepare(self, images: Sequence[Image.Image], options: RecognizeOptions) -> PreparedBatch:
        """Preprocess ``images`` (RGB) for ``generate``: the CPU half of ``recognize``, safe to run
        in another thread while ``generate`` runs, so a batch engine's next batch is ready the
        moment the model is free (``ModelManager``). The tensors stay on the CPU until
        ``generate``: a batch kept waiting holds no GPU memory.

        Raises ``EngineError`` when the engine is not loaded, the batch is too large or
        preprocessing fails.
        """
        processor = self._processor
        if self._model is None or processor is None:
            raise EngineError(f"{self.model_name} is not loaded")
        if len(images) > self.max_batch_size:
            raise EngineError(f"{len(images)} pages passed; this engine takes at most {self.max_batch_size}")
        if not images:
            return PreparedBatch(None, {}, 0)
        prompt = f"{IMAGE_TOKEN}\n{options.prompt}"
        # Without tiles the image processor resizes the global view to the tile size (768 px) while
        # the processor counts image tokens from `size` (1024 px): 257 tokens for 145 features, and
        # generate() fails. Sizing the global view at the tile size makes the two agree (transformers 5.23).
        tile = processor.image_processor.tile_size
        no_tiles = (
            {} if options.crop_mode else {"crop_to_patches": False, "size": {"height": tile, "width": tile}}
        )
        max_new_tokens = min(options.max_new_tokens, options.token_limit or options.max_new_tokens)
        generate_args: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "max_time": options.timeout_seconds,
            "do_sample": False,
        }
        no_repeat = _no_repeat_ngram_size(self._no_repeat_ngram_size, options.no_repeat_ngram_size)
        if no_repeat > 0:
            generate_args["no_repeat_ngram_size"] = no_repeat
        try:
            # A fast tokenizer is not safe across threads (padding mutates it): see _tokenizer_lock.
            with self._tokenizer_lock:
                inputs = processor(
                    images=list(images),
                    text=[prompt] * len(images),
                    return_tensors="pt",
                    padding=True,
                    **no_tiles,
                )
        except Exception as exc:
            raise EngineError(f"{self.model_name} failed on a batch of {len(images)} page(s): {exc}") from exc
        return PreparedBatch(inputs, generate_args, max_new_tokens)

    def generate(self, batch: PreparedBatch) -> list[PageText]:
        """One ``generate()`` call over a ``prepare``d batch (one at a time); one ``PageText`` per
        page, in order. Raises ``EngineError`` when the engine is not loaded or generation fails."""
        model, processor = self._model, self._processor
        if model is None or processor is None:
            raise EngineError(f"{self.model_name} is not loaded")
        if batch.inputs is None:
            return []
        rows = batch.inputs["input_ids"].shape[0]
        generate_args = dict(batch.generate_args)
        if self._logits_processors is not None:
            generate_args["logits_processor"] = LogitsProcessorList(self._logits_processors())
        try:
            # dtype applies to the pixel tensors only
            inputs = batch.inputs.to(self._device, dtype=self._dtype)
            with torch.inference_mode():
                output = model.generate(**inputs, **generate_args)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(
                f"out of GPU memory on a batch of {rows} page(s); lower APP_DS_BATCH_SIZE: {exc}"
            ) from exc
        except Exception as exc:
            # Anything torch or transformers raise mid-inference is this engine's failure.
            raise EngineError(f"{self.model_name} failed on a batch of {rows} page(s): {exc}") from exc
        tokenizer = processor.tokenizer
        eos_ids = _token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
        pad_ids = _token_ids(model.generation_config.pad_token_id, tokenizer.pad_token_id) - eos_ids
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        # Each row's prompt without its left padding: the attention mask is 1 on the real tokens.
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        with self._tokenizer_lock:
            return [
                _page_text(
                    row,
                    tokenizer,
                    eos_ids=eos_ids,
                    pad_ids=pad_ids,
                    max_new_tokens=batch.max_new_tokens,
                    prompt_tokens=int(prompt),
                )
                for row, prompt in zip(new_tokens, prompt_tokens, strict=True)
            ]


@dataclass(frozen=True)
class PreparedBatch:
    """A batch ``HFEngine.prepare`` made ready for ``HFEngine.generate``."""

    inputs: Any  # the processor's BatchFeature, on the CPU; None for no pages
    generate_args: dict[str, Any]
    max_new_tokens: int


def _no_repeat_ngram_size(own: int, asked: int | None) -> int:
    """The guard one call runs with: the engine's own (0: off), made stricter (a smaller n) by what
    the options ask for, never looser."""
    if asked is None or asked <= 0:
        return own
    return asked if own <= 0 else min(own, asked)


def _page_text(
    generated: list[int],
    tokenizer: Any,
    *,
    eos_ids: set[int],
    pad_ids: set[int],
    max_new_tokens: int,
    prompt_tokens: int,
) -> PageText:
    """Decode one row's new tokens: cut after its first eos, drop the padding of a finished row."""
    stop: StopReason
    end = next((i + 1 for i, token in enumerate(generated) if token in eos_ids), None)
    if end is not None:
        generated, stop = generated[:end], "eos"
    elif len(generated) >= max_new_tokens:
        stop = "max_tokens"
    else:
        stop = "timeout"  # max_time ended the whole generate() call
    kept = [token for token in generated if token not in pad_ids]
    # skip_special_tokens=False keeps the grounding tags and the end marker, verbatim.
    text = tokenizer.decode(kept, skip_special_tokens=False)
    return PageText(text=text, stop_reason=stop, tokens=len(generated), prompt_tokens=prompt_tokens)


def _token_ids(*values: int | list[int] | None) -> set[int]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids
