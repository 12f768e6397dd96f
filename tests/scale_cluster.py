"""A scale-out deployment on loopback: Redis, an S3 server and ``python -m app`` API and worker processes.

* ``RedisServer``: the real ``redis-server`` on a free port, append-only file fsynced at every write
  and no snapshots, so ``restart`` (SIGTERM, then the same port and directory) loses nothing.
* ``S3Server``: moto's S3 server in a thread of this process, with one bucket and a boto3 client to
  look at what the service wrote.
* ``Cluster``: API and worker processes sharing them, each with its own spool directory and log.
  Workers are killed (SIGKILL), stalled (SIGSTOP / SIGCONT) and started again by the tests.

Nothing here imports pytest: ``bench/scale.py`` starts the same deployment.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.s3_server import KEY_ID, SECRET, MotoS3
from tests.servers import REPO, LoopbackProcess, ProcessServer, wait_for

REDIS_SERVER = shutil.which("redis-server") or next(
    (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
)
API_KEY = "sk_test"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TERMINAL = ("succeeded", "failed", "canceled")
_SUCCEEDED = re.compile(r"task ([0-9a-f]{32}) succeeded")


class RedisServer(LoopbackProcess):
    """``redis-server`` on 127.0.0.1 and a free port; its data (the append-only file) in ``work_dir``."""

    def __init__(self, work_dir: Path) -> None:
        self.data_dir = work_dir / "redis"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(work_dir / "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisServer:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        command = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",  # an acknowledged write is on disk: a restart loses nothing
            "--save", "",  # no snapshots: the append-only file is the only copy
            "--protected-mode", "no",
        ]  # fmt: skip
        self.spawn(command, os.environ)
        wait_for(self._answers, timeout=timeout, interval=0.05)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_tail()}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False
        except redis.BusyLoadingError:
            return False  # still reading the append-only file back

    def client(self) -> redis.Redis:
        """A new client; close it (``with``)."""
        return redis.Redis.from_url(self.url, socket_timeout=5, decode_responses=True)

    def restart(self) -> RedisServer:
        """Stop gently (Redis flushes its file on SIGTERM) and start again on the same port and data."""
        self.stop()
        return self.start()


class S3Server(MotoS3):
    """moto's S3 server with one bucket, the one a deployment stores its tasks in."""

    def __init__(self) -> None:
        super().__init__()
        self.bucket_name = self.bucket()

    def objects(self, prefix: str = "") -> dict[str, str]:
        """Every object of the bucket under ``prefix``: its key and ETag."""
        return self.keys(self.bucket_name, prefix)

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket_name, Key=key)["Body"].read()


def result_keys(s3: S3Server, task_id: str, name: str = "full.md") -> list[str]:
    """The keys of ``name`` in every result directory of a task: ``tasks/<id>/out/<lease>/<name>``."""
    prefix = f"tasks/{task_id}/out/"
    return sorted(key for key in s3.objects(prefix) if key.endswith(f"/{name}") and key.count("/") == 4)


class Node(ProcessServer):
    """One ``python -m app`` process of the cluster (``role`` api or worker); survives kill/start."""

    def __init__(self, name: str, role: str, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.name = name
        self.role = role
        self.paused = False

    def launch(self) -> Node:
        """Start the process without waiting for it to answer."""
        self.paused = False
        self.spawn([sys.executable, "-m", "app"], self._env, cwd=REPO)
        return self

    def start(self, timeout: float = 120) -> Node:
        self.launch().wait_ready("/healthz", timeout)
        return self

    def pause(self) -> None:
        """SIGSTOP: the process stops where it is, holding its connections and its task."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        wait_for(self.stopped, timeout=10)

    def stopped(self) -> bool:
        """Whether the process is in the stopped state (``T`` in /proc)."""
        assert self.process is not None
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def resume(self) -> None:
        """SIGCONT: it goes on as if nothing happened."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = 120) -> Node:
        """Kill (SIGKILL) if running, then start again on the same port, appending to the same log."""
        self.kill()
        return self.start(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.paused and self.alive():
            self.resume()  # a stopped process would not act on SIGTERM
        super().stop()
        if self.process is not None and self.process.poll() is None:
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def succeeded_ids(self) -> list[str]:
        """The ids of the ``task <id> succeeded`` lines of its log, in order, repeats kept."""
        return _SUCCEEDED.findall(self.log())

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric on ``/metrics``; ``None`` when unreachable or absent."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None


class Cluster:
    """API and worker processes sharing ``redis`` and ``s3``; ``env`` adds or replaces ``APP_*`` values.

    ``start(apis, workers)`` starts them all at once (each takes a few seconds to import); clients
    from ``client(i)`` talk to API ``i`` and are closed by ``close``, which stops every process.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        model_dir: Path | None,
        redis_server: RedisServer,
        s3: S3Server,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.redis = redis_server
        self.s3 = s3
        self.env: dict[str, str] = {
            "APP_QUEUE_BACKEND": "redis",
            "APP_REDIS_URL": redis_server.url,
            "APP_STORAGE_BACKEND": "s3",
            "APP_S3_ENDPOINT_URL": s3.url,
            "APP_S3_BUCKET": s3.bucket_name,
            "APP_S3_REGION": "us-east-1",
            "APP_S3_ACCESS_KEY_ID": KEY_ID,
            "APP_S3_SECRET_ACCESS_KEY": SECRET,
            "APP_S3_ADDRESSING_STYLE": "path",
            "APP_VISIBILITY_TIMEOUT_SECONDS": "5",
            "APP_DS_DTYPE": "float32",
            "APP_DS_MAX_NEW_TOKENS": "48",
            "APP_DS_BATCH_SIZE": "1",
            "APP_API_KEYS": API_KEY,
            # Random weights cut at 48 tokens leave every page suspect, and each would be asked for
            # again; tests/test_retry_ladder.py shows a resumed task keeps its retries too.
            "APP_PAGE_RETRIES": "0",
            "APP_LOG_LEVEL": "info",
            "APP_MAX_WORKERS": "1",
            "APP_QUEUE_MAX": "1000",
            "OMP_NUM_THREADS": "1",  # two cores, several processes: one thread each keeps them honest
        }
        if model_dir is not None:
            self.env["APP_DS_MODEL_PATH"] = str(model_dir)
        self.env.update(env or {})
        self.apis: list[Node] = []
        self.workers: list[Node] = []
        self._clients: list[httpx.Client] = []

    def _node(self, role: str) -> Node:
        group = self.apis if role == "api" else self.workers
        name = f"{role}{len(group)}"
        data_dir = self.work_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "APP_ROLE": role, "APP_DATA_DIR": str(data_dir)}
        node = Node(name, role, env, self.work_dir / f"{name}.log")
        group.append(node)
        return node

    def add_api(self) -> Node:
        return self._node("api").start()

    def add_worker(self) -> Node:
        return self._node("worker").start()

    def start(self, apis: int, workers: int, timeout: float = 120) -> Cluster:
        """Start ``apis`` API and ``workers`` worker processes side by side; wait until all answer."""
        nodes = [self._node("api") for _ in range(apis)] + [self._node("worker") for _ in range(workers)]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready("/healthz", timeout)
        return self

    def client(self, index: int = 0, timeout: float = 60) -> httpx.Client:
        client = httpx.Client(base_url=self.apis[index].url, headers=HEADERS, timeout=timeout)
        self._clients.append(client)
        return client

    def succeeded_log_ids(self) -> Counter[str]:
        """How many ``task <id> succeeded`` lines each id has, across every worker's log."""
        return Counter(task_id for worker in self.workers for task_id in worker.succeeded_ids())

    def logs(self) -> str:
        """The tail of every process's log, for assertion messages."""
        return "\n".join(f"--- {node.name} ---\n{node.log_tail()}" for node in [*self.apis, *self.workers])

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for node in [*self.workers, *self.apis]:
            node.stop()


# --- calls that ride out a Redis restart ----------------------------------------------------------


def patiently(call: Callable[[], httpx.Response], timeout: float = 60) -> httpx.Response:
    """``call()`` again while it answers 503 or cannot connect (Redis restarting), up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = call()
            if response.status_code != 503:
                return response
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadTimeout):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def view(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = patiently(lambda: client.get(f"/v1/tasks/{task_id}"))
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_ended(client: httpx.Client, task_id: str, timeout: float = 120) -> dict[str, Any]:
    """The task view once the task ended."""
    return wait_for(lambda: (v := view(client, task_id))["status"] in TERMINAL and v, timeout, interval=0.2)


def submit(client: httpx.Client, document: bytes, name: str = "doc.pdf") -> str:
    response = patiently(lambda: client.post("/v1/tasks/upload", files={"file": (name, document)}))
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def listed_tasks(client: httpx.Client) -> Iterator[tuple[str, str]]:
    """``(task_id, status)`` of every task the caller has, following the listing's pages."""
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        response = patiently(functools.partial(client.get, "/v1/tasks", params=params))
        assert response.status_code == 200, response.text
        body = response.json()
        for task in body["tasks"]:
            yield task["task_id"], task["status"]
        cursor = body["next_cursor"]
        if not cursor:
            return
