"""Readiness: whether this process can do its part (``GET /readyz``), and the model's state.

Built once in ``create_app`` from the parts it asks: the worker pool (none on an API replica,
``APP_ROLE=api``, whose workers run elsewhere), the store, the queue and the model manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from app.engines.manager import ModelManager
from app.errors import BackendUnavailable
from app.storage.base import TaskStore
from app.tasks.queue import TaskQueue
from app.tasks.worker import WorkerPool
from app.tenants import Tenants

# Each check (the store takes writes, the queue answers) counts as failed past this: the Helm
# chart's readiness probe gives up after 5 s (``timeoutSeconds``), while the Redis clients retry a
# lost connection for about 15 s (``app.storage.redis_conn``) and would hold the answer that long.
CHECK_SECONDS = 3.0


class Readiness:
    """The readiness report: workers alive, storage writable, queue reachable.

    ``role`` (``APP_ROLE``) and ``workers`` (``APP_MAX_WORKERS``) are reported as given, ``auth``
    and the tenants file's state from ``tenants``. ``pool`` is ``None`` where this process runs no
    workers.
    """

    def __init__(
        self,
        *,
        pool: WorkerPool | None,
        store: TaskStore,
        queue: TaskQueue,
        models: ModelManager,
        role: str,
        tenants: Tenants,
        workers: int,
    ) -> None:
        self._pool = pool
        self._store = store
        self._queue = queue
        self._models = models
        self._role = role
        self._tenants = tenants
        self._workers = workers

    async def report(self, *, with_model: bool) -> dict[str, Any]:
        """The report as JSON: ``status`` is ``"ready"`` when every worker runs, the store takes
        writes and the queue answers, else ``"not_ready"``; then ``role``, ``auth``, ``workers``
        (``alive``, ``configured``), ``storage_writable``, ``queue_depth`` (``None`` when the
        queue is unreachable) and, with ``APP_TENANTS_FILE``, ``tenants``: ``{"file_ok"}``, false
        while the file's current content is refused and the last good one serves (not a reason to
        stop traffic: the report stays ``ready``). ``with_model`` adds ``model``: which model, why,
        its last error and the engine server, and the tenants file's ``error`` (details for the
        service's users only, as they name tenants). Raises nothing of its own."""
        pool = self._pool
        writable, depth = await asyncio.gather(self._writable(), self._depth())
        workers_ok = pool is None or pool.healthy
        body: dict[str, Any] = {
            "status": "ready" if workers_ok and writable and depth is not None else "not_ready",
            "role": self._role,
            "auth": "enabled" if self._tenants.enabled else "disabled",
            "workers": {
                "alive": pool.alive if pool is not None else 0,
                "configured": self._workers if pool is not None else 0,
            },
            "storage_writable": writable,
            "queue_depth": depth,
        }
        if self._tenants.file is not None:
            error = self._tenants.error
            body["tenants"] = {"file_ok": error is None}
            if with_model:
                body["tenants"]["error"] = error
        if with_model:
            body["model"] = await self._model_state()
        return body

    async def _writable(self) -> bool:
        """Whether the store takes writes, answered within ``CHECK_SECONDS`` (a check still running
        then goes on in its thread and is not waited for)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._store.writable), CHECK_SECONDS)
        except TimeoutError:
            return False

    async def _depth(self) -> int | None:
        """The queue's depth, or ``None`` when it does not answer within ``CHECK_SECONDS``."""
        try:
            return await asyncio.wait_for(self._queue.depth(), CHECK_SECONDS)
        except (BackendUnavailable, TimeoutError):
            return None

    async def _model_state(self) -> dict[str, Any]:
        state = self._models.state
        # The vllm engine's OCR server, when it has one: reported, not required, so that results stay
        # reachable (and tasks keep queueing) while that server restarts.
        server = await self._models.server_health()
        return {
            "loaded": state.loaded,
            "name": state.model,
            "detail": state.detail,
            "last_error": state.last_error,
            "server": dataclasses.asdict(server) if server is not None else None,
        }
