"""Builds the configured engine: resolve the checkpoint for this environment, then its adapter."""

from __future__ import annotations

import logging

from app.config import Settings
from app.engines.base import OCREngine
from app.engines.hf import build_engine, pick_device
from app.engines.manager import EngineFactory
from app.engines.resolve import resolve_model

log = logging.getLogger(__name__)


def engine_factory(settings: Settings) -> EngineFactory:
    """A factory the ``ModelManager`` calls on first use (blocking: may fetch a config file)."""

    def build() -> tuple[OCREngine, str]:
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

    return build
