"""Page images and a prompt in, raw text out.

- ``base``: the engine contract (``Engine``, ``PageText``, ``RecognizeOptions``); ``async_base``
  the asynchronous one of remote servers
- ``manager.ModelManager``: one engine, loaded on first use and unloaded when idle
- ``factory``: which engine settings name (``build_engine`` picks the transformers adapter);
  ``resolve``: which checkpoint
- ``hf`` / ``remote_code`` (transformers, sharing ``torch_support``), ``vllm`` (an OpenAI-compatible
  server; ``token_budget`` sizes ``max_tokens``), ``vllm_local`` (in process)
- ``gpu``: the NVML probe and the GPU gate
"""

# Modules, not names: importing the package must not import torch (only the transformers engines do).
__all__ = [
    "async_base",
    "base",
    "factory",
    "gpu",
    "hf",
    "manager",
    "remote_code",
    "resolve",
    "token_budget",
    "torch_support",
    "vllm",
    "vllm_local",
]
