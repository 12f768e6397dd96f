"""Builds the configured engine: ``hf`` (resolve the checkpoint for this environment, then its
adapter) or ``vllm`` (a remote OpenAI-compatible server, or vLLM in this process)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.config import Settings
from app.engines.base import OCREngine
from app.engines.manager import Engine, EngineFactory, HealthCheck
from app.engines.token_budget import prompt_token_bound
from app.engines.vllm import RemoteEngine, check_server

if TYPE_CHECKING:
    from app.engines.resolve import ModelChoice

log = logging.getLogger(__name__)

VLLM_DEFAULT_MODEL = "deepseek-ai/DeepSeek-OCR"  # vLLM serves v1 natively, on any transformers
HEALTH_TIMEOUT_SECONDS = 5.0  # /readyz must answer quickly even when the OCR server hangs


def engine_factory(settings: Settings) -> EngineFactory:
    """A factory the ``ModelManager`` calls on first use (blocking: may fetch a config file)."""
    if settings.backend == "vllm":
        return lambda: _build_vllm(settings)
    return lambda: _build_hf(settings)


def planned_model(settings: Settings) -> tuple[str, str] | None:
    """The checkpoint the ``hf`` engine will choose when ``APP_DS_MODEL_PATH`` is unset, and why.

    Known before anything loads (only the device and the transformers version decide it), so
    /readyz and the start-up log can say it at once; ``None`` when the choice is the user's.
    """
    if settings.backend != "hf" or settings.ds_model_path is not None:
        return None
    from app.engines.resolve import default_model_path
    from app.engines.torch_support import pick_device

    path, reason = default_model_path(cuda_available=pick_device(settings.force_cpu) == "cuda")
    log.info("model %s will be loaded on the first task: %s", path, reason)
    return path, reason


def server_health_check(settings: Settings) -> HealthCheck | None:
    """For /readyz: a probe of the OCR server, when the engine talks to one (``APP_VLLM_URL``).

    It also reports the server's context and the token cap a page in the default mode gets from it,
    worked out as the engine does (``RemoteEngine.token_cap``), before the engine is even started.
    """
    url = settings.vllm_url
    if settings.backend != "vllm" or url is None:
        return None
    api_key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
    timeout = min(HEALTH_TIMEOUT_SECONDS, settings.vllm_timeout_seconds)
    bound = prompt_token_bound(
        settings.ds_prompt_override,
        base_size=settings.ds_base_size,
        image_size=settings.ds_image_size,
        crop_mode=settings.ds_crop_mode,
    )
    return lambda: check_server(
        url,
        api_key=api_key,
        timeout_seconds=timeout,
        model=settings.vllm_model,
        max_tokens=settings.vllm_max_tokens,
        prompt_bound=bound,
    )


def _build_vllm(settings: Settings) -> tuple[Engine, str]:
    if settings.vllm_url is not None:
        engine = RemoteEngine(
            settings.vllm_url,
            model=settings.vllm_model,
            api_key=settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None,
            concurrency=settings.vllm_concurrency,
            max_tokens=settings.vllm_max_tokens,
            timeout_seconds=settings.vllm_timeout_seconds,
            retries=settings.vllm_retries,
            server_kind=settings.vllm_server_kind,
        )
        return engine, f"APP_BACKEND=vllm: the OpenAI-compatible server at {engine.url}"
    # Imported here: it is only needed in this mode, and it imports nothing heavy until started.
    from app.engines.vllm_local import VllmEngine

    model = settings.vllm_model or settings.ds_model_path or VLLM_DEFAULT_MODEL
    local = VllmEngine(
        model,
        concurrency=settings.vllm_concurrency,
        max_tokens=settings.vllm_max_tokens,
        timeout_seconds=settings.vllm_timeout_seconds,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_model_len=settings.vllm_max_model_len,
    )
    return local, "APP_BACKEND=vllm without APP_VLLM_URL: vLLM inside this process"


def _build_hf(settings: Settings) -> tuple[Engine, str]:
    # Imported here: torch and transformers are not needed by a service that uses a remote server.
    from app.engines.resolve import resolve_model
    from app.engines.torch_support import pick_device

    device = pick_device(settings.force_cpu)
    choice = resolve_model(
        settings.ds_model_path,
        cuda_available=device == "cuda",
        download_timeout=settings.hf_download_timeout_seconds,
    )
    log.info("model %s (%s) on %s: %s", choice.path, choice.family.value, device, choice.reason)
    engine = build_engine(
        choice,
        device=device,
        dtype=settings.ds_dtype,
        use_flash_attn=settings.ds_use_flash_attn,
        batch_size=settings.ds_batch_size,
        no_repeat_ngram_size=settings.ds_no_repeat_ngram_size,
    )
    return engine, f"{choice.reason} (device: {device})"


def build_engine(
    choice: ModelChoice,
    *,
    device: str,
    dtype: str,
    use_flash_attn: bool,
    batch_size: int,
    no_repeat_ngram_size: int,
) -> OCREngine:
    """The engine for ``choice``'s family, not yet loaded.

    The remote-code engine takes one page per call and uses its ``infer()``'s own n-gram guard, so
    ``batch_size`` and ``no_repeat_ngram_size`` apply to the native engine only.
    """
    # Imported here: torch and transformers are not needed by a service that uses a remote server.
    from app.engines.resolve import ModelFamily

    if choice.family is ModelFamily.OCR2_NATIVE:
        from app.engines.hf import HFEngine

        return HFEngine(
            choice.path,
            device=device,
            dtype=dtype,
            use_flash_attn=use_flash_attn,
            batch_size=batch_size,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
    from app.engines.remote_code import RemoteCodeEngine

    return RemoteCodeEngine(choice.path, device=device, dtype=dtype, use_flash_attn=use_flash_attn)
