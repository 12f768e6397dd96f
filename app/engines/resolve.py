"""Which checkpoint to run and through which adapter.

Two families of DeepSeek-OCR checkpoints exist and no single transformers release runs both:

* ``deepseek_ocr2``: DeepSeek-OCR-2 in transformers' own classes (transformers >= 5.11; CPU or GPU),
  e.g. ``deepseek-community/DeepSeek-OCR-2``;
* remote code: DeepSeek-OCR v1 (``deepseek-ai/DeepSeek-OCR``, and the official OCR-2 repo) ships its
  own modeling files, loaded with ``trust_remote_code``, and needs CUDA and transformers < 4.48.

The family is read from the checkpoint's ``config.json``, never guessed from its name. Nothing here
imports torch: the caller says whether CUDA is present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import transformers

# Imported from where both the huggingface_hub of a v1 image (0.2x) and today's (2.x) have them.
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    validate_repo_id,
)
from packaging.version import Version

from app.errors import ModelUnavailable

V1_MODEL = "deepseek-ai/DeepSeek-OCR"
OCR2_NATIVE_MODEL = "deepseek-community/DeepSeek-OCR-2"
# v1's remote code imports LlamaFlashAttention2, which transformers removed in 4.48.
V1_MAX_TRANSFORMERS = Version("4.48")

_WHAT_WORKS = (
    f"the hf engine runs DeepSeek-OCR-2 in the transformers-native format (model_type 'deepseek_ocr2', "
    f"e.g. {OCR2_NATIVE_MODEL}) or DeepSeek-OCR's remote code (e.g. {V1_MODEL}, with CUDA and "
    f"transformers < {V1_MAX_TRANSFORMERS})"
)
_FIX = "set APP_DS_MODEL_PATH to a local checkpoint directory, or allow downloads from the Hugging Face Hub"


class ModelFamily(StrEnum):
    """How a checkpoint is loaded and run."""

    OCR2_NATIVE = "deepseek_ocr2"  # transformers-native classes, AutoModelForImageTextToText
    REMOTE_CODE = "remote_code"  # DeepSeek-OCR v1 (and the official OCR-2 repo): trust_remote_code + infer()


@dataclass(frozen=True)
class ModelChoice:
    """The checkpoint to load, its family, and why it was chosen."""

    path: str  # a local directory or a Hub repo id
    family: ModelFamily
    reason: str  # a sentence for people, shown in /readyz and logged at start-up


def default_model_path(cuda_available: bool) -> tuple[str, str]:
    """The checkpoint to use when ``APP_DS_MODEL_PATH`` is unset, and a sentence saying why.

    DeepSeek-OCR v1 where CUDA and a transformers older than 4.48 are both present (a GPU image
    pinned for v1); otherwise the transformers-native DeepSeek-OCR-2, which runs on CPU and GPU.
    """
    found = Version(transformers.__version__)
    if cuda_available and found < V1_MAX_TRANSFORMERS:
        return V1_MODEL, (
            f"APP_DS_MODEL_PATH is unset; CUDA and transformers {found} (< {V1_MAX_TRANSFORMERS}) are "
            f"present, so the original {V1_MODEL} runs through its remote code"
        )
    why = (
        "no CUDA device" if not cuda_available else f"transformers {found} cannot run DeepSeek-OCR v1's code"
    )
    return OCR2_NATIVE_MODEL, (
        f"APP_DS_MODEL_PATH is unset and {why}, so {OCR2_NATIVE_MODEL} runs through transformers' native "
        f"DeepSeek-OCR-2 classes"
    )


def resolve_model(path: str | None, *, cuda_available: bool, download_timeout: float) -> ModelChoice:
    """Decide the checkpoint and its family.

    ``path`` is ``APP_DS_MODEL_PATH``: a local directory or a Hub repo id; ``None`` picks
    ``default_model_path``. Only ``config.json`` is read (downloaded for a repo id, at most one
    request bounded by ``download_timeout`` seconds; a cached copy is used first).
    Raises ``ModelUnavailable`` when the checkpoint cannot be found or read, or is of a family the
    hf engine cannot run; the message names the path, the cause and what would work.
    """
    if path is None:
        path, reason = default_model_path(cuda_available)
    else:
        reason = f"APP_DS_MODEL_PATH={path}"
    config = _read_config(path, download_timeout)
    family = _family_of(path, config)
    how = (
        "transformers' native DeepSeek-OCR-2 classes"
        if family is ModelFamily.OCR2_NATIVE
        else "its own remote code (trust_remote_code, infer())"
    )
    return ModelChoice(path=path, family=family, reason=f"{reason}; config.json says it runs through {how}")


def _family_of(path: str, config: dict[str, Any]) -> ModelFamily:
    model_type = config.get("model_type")
    if model_type == ModelFamily.OCR2_NATIVE.value:
        return ModelFamily.OCR2_NATIVE
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and "AutoModel" in auto_map:
        return ModelFamily.REMOTE_CODE
    raise ModelUnavailable(
        f"{path}: config.json has model_type {model_type!r} and no remote code (auto_map.AutoModel); "
        f"{_WHAT_WORKS}"
    )


def _read_config(path: str, timeout: float) -> dict[str, Any]:
    local = Path(path).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelUnavailable(
                f"{path} is a directory without config.json, so it is no checkpoint; {_FIX}"
            )
    elif local.exists() or _looks_like_a_path(path):
        raise ModelUnavailable(f"model path {path} is not a directory (and not a Hub repo id); {_FIX}")
    else:
        config_file = _fetch_config(path, timeout)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"{path}: cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelUnavailable(f"{path}: {config_file} is not a JSON object")
    return config


def _looks_like_a_path(path: str) -> bool:
    """Whether ``path`` can only be meant as a directory: it is no valid Hub repo id."""
    if path.startswith((".", "/", "~")) or "\\" in path:
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def _fetch_config(repo_id: str, timeout: float) -> Path:
    """Download (or find in the Hub cache) the repo's ``config.json``, failing within ``timeout``."""
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached yet: ask the Hub below
    if hub_constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            f"{repo_id} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"forbids downloading it; {_FIX}"
        )
    # One HEAD request without retries, bounded by `timeout`: hf_hub_download alone retries a
    # failing connection five times with growing pauses (more than 20 s with no network).
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=timeout)
        return Path(hf_hub_download(repo_id, "config.json", etag_timeout=timeout))
    except GatedRepoError as exc:
        raise ModelUnavailable(
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN, or {_FIX}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(
            f"{repo_id} is neither a local directory nor a Hub repository (or it is private); {_FIX}"
        ) from exc
    except EntryNotFoundError as exc:
        raise ModelUnavailable(f"{repo_id} has no config.json, so it is no transformers checkpoint") from exc
    except Exception as exc:
        # DNS failures, refused connections, timeouts, HTTP errors: the transport's exceptions
        # (httpx, requests, depending on the huggingface_hub release) share no narrower base.
        raise ModelUnavailable(
            f"{repo_id} is not a local directory and cannot be downloaded from the Hugging Face Hub "
            f"({exc}); {_FIX}"
        ) from exc
