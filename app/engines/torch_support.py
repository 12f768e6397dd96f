"""What both transformers engines (``hf.py``, ``remote_code.py``) need of torch: the device, the
dtype, whether flash attention may be asked for, how a failed load reads, and giving memory back."""

from __future__ import annotations

import gc
import importlib.util

import torch
import transformers

from app.errors import ModelUnavailable

# Where the page goes in the prompt; DeepSeek-OCR's prompts start with it.
IMAGE_TOKEN = "<image>"  # noqa: S105 - a prompt token, not a secret

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(force_cpu: bool) -> str:
    """``"cuda"`` when a CUDA device is present and ``APP_FORCE_CPU`` is off, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() and not force_cpu else "cpu"


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype for ``APP_DS_DTYPE`` on ``device``.

    ``auto`` is bfloat16 on CUDA and float32 on CPU: CPUs without native bf16 matmuls run the model
    4-13x slower in bfloat16 than in float32 (measured on the tiny model, 2 cores).
    """
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def flash_attention_usable(device: str, use_flash_attn: bool) -> bool:
    """Whether flash_attention_2 may be asked for: wanted, on CUDA, and ``flash_attn`` importable."""
    return use_flash_attn and device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None


def load_failure(model_name: str, exc: Exception) -> ModelUnavailable:
    """What a failed ``from_pretrained`` tells the user: the checkpoint is missing (``OSError``), or
    it is one this transformers cannot load (wrong model type, broken config, missing dependency)."""
    if isinstance(exc, OSError):
        return ModelUnavailable(f"cannot load the model from {model_name}: {exc}")
    return ModelUnavailable(
        f"{model_name} cannot be loaded with transformers {transformers.__version__}: {exc}"
    )


def release_memory(device: str) -> None:
    """Collect what the caller just dropped and hand cached CUDA blocks back to the driver.

    Without ``empty_cache`` the allocator keeps the freed weights reserved: NVML (the GPU gate) and
    other processes would still see the memory as used.
    """
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
