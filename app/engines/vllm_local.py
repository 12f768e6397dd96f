"""The ``vllm`` backend, in-process mode: vLLM's async engine inside the service process.

Used when ``APP_BACKEND=vllm`` and ``APP_VLLM_URL`` is unset (the ``Dockerfile.vllm`` image). It
follows vLLM's DeepSeek-OCR recipe: the ``NGramPerReqLogitsProcessor`` with the same per-request
arguments the remote mode sends (``NGRAM_ARGS``), prefix caching and the multimodal processor cache
off (every page is a new image), ``skip_special_tokens=False``. vLLM needs a GPU build and is not a
dependency of the service: where it is missing, ``start`` raises ``ModelUnavailable`` saying so.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import uuid
from typing import Any

from PIL import Image

from app.engines.base import END_MARKER, PageText, RecognizeOptions, StopReason
from app.engines.vllm import ngram_args
from app.errors import EngineError, ModelUnavailable

log = logging.getLogger(__name__)

NGRAM_PROCESSOR = "vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor"


def _import_vllm() -> tuple[Any, Any]:
    """``vllm`` and the n-gram logits processor class, or ``ModelUnavailable`` saying what is missing."""
    module_name, _, class_name = NGRAM_PROCESSOR.partition(":")
    try:
        vllm = importlib.import_module("vllm")
        processor = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ModelUnavailable(
            "APP_BACKEND=vllm without APP_VLLM_URL runs vLLM inside this process, but vLLM cannot be "
            f"imported here ({exc}); install vllm on a machine with a GPU (the Dockerfile.vllm image "
            "has it), or set APP_VLLM_URL to a running `vllm serve` server"
        ) from exc
    except AttributeError as exc:
        raise ModelUnavailable(
            f"this vLLM ({getattr(vllm, '__version__', '?')}) has no {NGRAM_PROCESSOR}, which the "
            "DeepSeek-OCR recipe needs; use vLLM 0.11.1 or newer"
        ) from exc
    return vllm, processor


class VllmEngine:
    """DeepSeek-OCR in vLLM's ``AsyncLLMEngine``, in this process; a ``ConcurrentEngine``.

    ``start`` builds the engine (minutes: weights, CUDA graphs) in a thread. ``max_tokens`` ``None``
    leaves the cap to vLLM, which gives a request what ``max_model_len`` leaves after its prompt
    (in-process there is no front end to refuse a larger one). ``recognize_page``
    streams one request per page and keeps the latest output, so a page that passes
    ``timeout_seconds`` ends with the text it had (``stop_reason="timeout"``) and its request is
    aborted, as the ``hf`` engine's ``max_time`` does. ``stop`` shuts vLLM down and frees the GPU.
    """

    def __init__(
        self,
        model: str,
        *,
        concurrency: int,
        max_tokens: int | None,
        timeout_seconds: float,
        gpu_memory_utilization: float,
        max_model_len: int | None,
    ) -> None:
        self.model_name = model
        self.max_concurrency = concurrency
        self._max_tokens = max_tokens
        self._timeout = timeout_seconds
        self._gpu_memory_utilization = gpu_memory_utilization
        self._max_model_len = max_model_len
        self._engine: Any = None
        self._vllm: Any = None  # the vllm module, imported by start()

    async def start(self) -> None:
        """Import vLLM and build the engine; ``ModelUnavailable`` when vLLM is missing or unfit."""
        if self._engine is not None:
            return
        vllm, ngram_processor = _import_vllm()
        args = vllm.AsyncEngineArgs(
            model=self.model_name,
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            logits_processors=[ngram_processor],
            gpu_memory_utilization=self._gpu_memory_utilization,
            max_model_len=self._max_model_len,
            max_num_seqs=self.max_concurrency,
        )
        try:
            engine = await asyncio.to_thread(vllm.AsyncLLMEngine.from_engine_args, args)
        except Exception as exc:  # CUDA missing or out of memory, a checkpoint vLLM cannot serve
            raise ModelUnavailable(f"vLLM cannot serve {self.model_name} here: {exc}") from exc
        self._vllm = vllm
        self._engine = engine
        log.info("vLLM engine for %s started in this process", self.model_name)

    async def stop(self) -> None:
        """Shut vLLM down (its worker processes and GPU memory); no-op when not started."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def _sampling(self, options: RecognizeOptions) -> Any:
        """The recipe's sampling parameters for one page: greedy, special tokens kept, the n-gram
        guard as ``options`` asks (``ngram_args``), ``options.token_limit`` below ``max_tokens``."""
        xargs = ngram_args(options)
        max_tokens = self._max_tokens
        if options.token_limit is not None:
            max_tokens = options.token_limit if max_tokens is None else min(max_tokens, options.token_limit)
        return self._vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            # The processor reads a set of ids (the recipe passes one); JSON gave a list.
            extra_args={**xargs, "whitelist_token_ids": set(xargs["whitelist_token_ids"])},
            skip_special_tokens=False,
        )

    async def recognize_page(self, image: Image.Image, options: RecognizeOptions) -> PageText:
        """One vLLM request for ``image`` with ``<image>\\n`` + ``options.prompt``."""
        engine = self._engine
        if engine is None:
            raise EngineError(f"the vLLM engine for {self.model_name} is not started")
        request = {"prompt": f"<image>\n{options.prompt}", "multi_modal_data": {"image": image}}
        sampling = self._sampling(options)
        latest: Any = None
        try:
            async with asyncio.timeout(self._timeout):
                # Leaving the generator early (on the timeout) aborts the request inside vLLM.
                async for output in engine.generate(request, sampling, uuid.uuid4().hex):
                    latest = output
        except TimeoutError:
            return _page_text(latest, timed_out=True)
        except Exception as exc:
            raise EngineError(f"vLLM failed on a page: {type(exc).__name__}: {exc}") from exc
        return _page_text(latest, timed_out=False)


def _page_text(output: Any, *, timed_out: bool) -> PageText:
    """A ``PageText`` from vLLM's latest ``RequestOutput`` (``None`` when nothing came yet)."""
    if output is None:
        return PageText(text="", stop_reason="timeout", tokens=0)
    completion = output.outputs[0]
    text, tokens = completion.text, len(completion.token_ids)
    prompt_tokens = len(output.prompt_token_ids or ())
    stop: StopReason
    if timed_out:
        stop = "timeout"
    elif completion.finish_reason == "length":
        stop = "max_tokens"
    elif completion.finish_reason == "stop":
        stop = "eos"
        if not text.endswith(END_MARKER):  # vLLM leaves the eos token out of the text
            text += END_MARKER
    else:
        raise EngineError(f"vLLM ended a page with finish_reason {completion.finish_reason!r}")
    return PageText(text=text, stop_reason=stop, tokens=tokens, prompt_tokens=prompt_tokens)
