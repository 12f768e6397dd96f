"""Choosing the checkpoint and its family: local directories, the Hub cache, a Hub on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import transformers
from huggingface_hub import constants

from app.engines.resolve import (
    OCR2_NATIVE_MODEL,
    V1_MODEL,
    ModelFamily,
    default_model_path,
    resolve_model,
)
from app.errors import ModelUnavailable
from tests.tiny_model import write_remote_code_standin

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_default_is_ocr2_native_without_cuda() -> None:
    path, reason = default_model_path(cuda_available=False)
    assert path == OCR2_NATIVE_MODEL
    assert "no CUDA" in reason


def test_default_with_cuda_follows_the_transformers_release() -> None:
    path, reason = default_model_path(cuda_available=True)
    # This environment has transformers 5.x: v1's remote code cannot run here even with CUDA.
    assert transformers.__version__.startswith("5.")
    assert path == OCR2_NATIVE_MODEL
    assert transformers.__version__ in reason
    assert path != V1_MODEL


def test_tiny_checkpoint_is_ocr2_native(tiny_model_dir: Path) -> None:
    choice = resolve_model(str(tiny_model_dir), cuda_available=False, download_timeout=1)
    assert choice.path == str(tiny_model_dir)
    assert choice.family is ModelFamily.OCR2_NATIVE
    assert str(tiny_model_dir) in choice.reason


def test_remote_code_checkpoint_is_remote_code(tmp_path: Path) -> None:
    standin = write_remote_code_standin(tmp_path / "standin")
    choice = resolve_model(str(standin), cuda_available=False, download_timeout=1)
    assert choice.family is ModelFamily.REMOTE_CODE
    assert "remote code" in choice.reason


def test_an_unknown_family_names_what_would_work(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelUnavailable, match=r"'llama'.*deepseek_ocr2.*DeepSeek-OCR"):
        resolve_model(str(tmp_path), cuda_available=False, download_timeout=1)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "without config.json"), ("{not json", "cannot read"), ("[1, 2]", "not a JSON object")],
)
def test_a_broken_directory_is_unavailable(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelUnavailable, match=message):
        resolve_model(str(tmp_path), cuda_available=False, download_timeout=1)


@pytest.mark.parametrize("name", ["no-such-dir", "a/b/c"])
def test_a_missing_local_path_is_unavailable(tmp_path: Path, name: str) -> None:
    missing = str(tmp_path / name)
    with pytest.raises(ModelUnavailable, match=r"is not a directory.*APP_DS_MODEL_PATH") as caught:
        resolve_model(missing, cuda_available=False, download_timeout=1)
    assert missing in caught.value.message


@pytest.mark.parametrize("path", ["deepseek-ai/DeepSeek-OCR", None])
def test_a_hub_id_offline_fails_fast_and_says_what_to_do(path: str | None) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=r"HF_HUB_OFFLINE.*APP_DS_MODEL_PATH") as caught:
        resolve_model(path, cuda_available=False, download_timeout=30)
    assert time.monotonic() - started < 5
    assert (path or OCR2_NATIVE_MODEL) in caught.value.message


def test_a_hub_id_in_the_cache_resolves_offline() -> None:
    # The layout huggingface_hub gives a downloaded file: refs/main names the snapshot.
    repo = Path(constants.HF_HUB_CACHE) / "models--dsocr-tests--cached-ocr2"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "deepseek_ocr2"}))
    choice = resolve_model("dsocr-tests/cached-ocr2", cuda_available=False, download_timeout=1)
    assert choice.family is ModelFamily.OCR2_NATIVE


# --- online: a Hub on loopback, resolve_model run in a child process with downloads allowed ---

HUB_CONFIGS = {
    "dsocr/ocr2": {"model_type": "deepseek_ocr2"},
    "dsocr/v1": {"model_type": "deepseek_vl_v2", "auto_map": {"AutoModel": "modeling.M"}},
}
SLOW_REPO = "dsocr/slow"  # answers after the client's timeout


class FakeHub(BaseHTTPRequestHandler):
    """The two Hub routes hf_hub_download uses for one file: HEAD and GET of .../resolve/main/<file>."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        repo, _, rest = self.path.lstrip("/").partition("/resolve/main/")
        if repo == SLOW_REPO:
            time.sleep(3)
        if repo not in HUB_CONFIGS or rest != "config.json":
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps(HUB_CONFIGS[repo]).encode()
        self.send_response(200)
        self.send_header("ETag", f'"{abs(hash(payload)):x}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows failures, not each request."""


@pytest.fixture(scope="module")
def hub_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True  # the slow route must not hold up shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


RESOLVE_SCRIPT = """
import json, sys, time
from app.engines.resolve import resolve_model
from app.errors import ModelUnavailable
for repo in sys.argv[1:]:
    started = time.monotonic()
    try:
        answer = {"family": str(resolve_model(repo, cuda_available=False, download_timeout=0.5).family)}
    except ModelUnavailable as exc:
        answer = {"error": exc.message}
    answer["seconds"] = time.monotonic() - started
    print(json.dumps(answer))
"""


def resolve_online(endpoint: str, hf_home: Path, *repos: str) -> list[dict[str, Any]]:
    """resolve_model() in a child whose huggingface_hub sees ``endpoint`` with downloads allowed.

    A child, because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import.
    """
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)}
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE_SCRIPT, *repos],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_online_hub_ids_resolve_and_failures_are_fast(hub_url: str, tmp_path: Path) -> None:
    ocr2, v1, missing, slow = resolve_online(
        hub_url, tmp_path, "dsocr/ocr2", "dsocr/v1", "dsocr/missing", SLOW_REPO
    )
    assert ocr2["family"] == ModelFamily.OCR2_NATIVE
    assert v1["family"] == ModelFamily.REMOTE_CODE
    assert "neither a local directory nor a Hub repository" in str(missing["error"])
    assert "cannot be downloaded" in str(slow["error"])
    assert float(slow["seconds"]) < 2  # bounded by download_timeout (0.5 s), no retries


def test_an_unreachable_hub_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    [answer] = resolve_online(closed, tmp_path, "dsocr/ocr2")
    assert "cannot be downloaded" in str(answer["error"])
    assert "APP_DS_MODEL_PATH" in str(answer["error"])
    assert float(answer["seconds"]) < 2  # huggingface_hub alone would retry for more than 20 s
