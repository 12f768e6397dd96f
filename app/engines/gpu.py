"""GPU memory through NVML, and the gate that holds tasks until enough of it is free.

NVML is a boundary: without a GPU (or with ``APP_FORCE_CPU``) the probe reports nothing and the
gate is open. Tests stand in their own ``GpuProbe`` to drive the gate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total_bytes: int
    used_bytes: int
    free_bytes: int


class GpuProbe(Protocol):
    """Reads GPU memory; ``None`` means there is no GPU to gate on."""

    def memory(self) -> GpuMemory | None: ...


class NoGpu:
    """The probe for CPU deployments: nothing to measure, the gate stays open."""

    def memory(self) -> GpuMemory | None:
        return None


def _visible_device_index() -> int:
    # NVML numbers every GPU on the host; torch's cuda:0 is the first of CUDA_VISIBLE_DEVICES.
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


class NvmlProbe:
    """Free and used memory of the GPU the model runs on, from NVML (``nvidia-ml-py``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle: object | None = None
        self._unavailable = False

    def _get_handle(self) -> object | None:
        with self._lock:
            if self._handle is None and not self._unavailable:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._handle = pynvml.nvmlDeviceGetHandleByIndex(_visible_device_index())
                except Exception as exc:  # NVML missing, no driver, no device: all mean "no GPU here"
                    log.info("NVML unavailable (%s); the GPU memory gate is open", exc)
                    self._unavailable = True
            return self._handle

    def memory(self) -> GpuMemory | None:
        handle = self._get_handle()
        if handle is None:
            return None
        import pynvml

        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuMemory(_visible_device_index(), int(info.total), int(info.used), int(info.free))


class GpuGate:
    """Lets a task start only when the GPU has at least ``min_free_mb`` MiB free.

    Without a GPU the gate is open. ``wait`` polls every ``poll_seconds`` and reports why it waits
    through ``on_wait`` once, so the task's status can say so.
    """

    def __init__(self, probe: GpuProbe, *, min_free_mb: int, poll_seconds: float) -> None:
        self.probe = probe
        self.min_free_bytes = min_free_mb * MIB
        self.poll_seconds = poll_seconds

    async def wait(self, on_wait: Callable[[str], Awaitable[None]]) -> None:
        reported = False
        while True:
            memory = await asyncio.to_thread(self.probe.memory)
            if memory is None or memory.free_bytes >= self.min_free_bytes:
                return
            if not reported:
                reported = True
                await on_wait(
                    f"waiting for GPU memory: {memory.free_bytes // MIB} MiB free on GPU {memory.index}, "
                    f"{self.min_free_bytes // MIB} MiB needed (APP_GPU_MIN_FREE_MB)"
                )
            await asyncio.sleep(self.poll_seconds)
