"""Real servers for tests: the app under uvicorn on loopback, in a thread or a separate process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """``app`` served by a real uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


class LoopbackProcess:
    """A server in its own process on a free loopback port; its output goes to ``log_path``.

    ``kill`` is SIGKILL (no shutdown hook runs, as when a machine or container dies); ``stop``
    terminates it gently and kills it if it does not go.
    """

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, command: list[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, health_path: str, timeout: float) -> None:
        """Poll ``health_path`` until it answers 200; raise with the log's tail if the process dies."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args!r} exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{health_path}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.process.args!r} did not start in {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class ProcessServer(LoopbackProcess):
    """``python -m app`` in its own process, configured by ``APP_*`` variables, like a user runs it."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(log_path)
        self._env = {**os.environ, **env, "APP_HOST": "127.0.0.1", "APP_PORT": str(self.port)}

    def start(self, timeout: float = 60) -> ProcessServer:
        self.spawn([sys.executable, "-m", "app"], self._env, cwd=REPO)
        self.wait_ready("/healthz", timeout)
        return self


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
