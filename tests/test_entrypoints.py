"""The three documented ways to start the service, run exactly as a user types them.

``uvicorn app.main:app`` is the seed's own command; ``python -m app`` and ``dsocr serve`` are the
README's. Each must serve, refuse a request without the key, and convert a PDF with the real default
engine (the tiny model stands in for the weights through ``APP_DS_MODEL_PATH``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.documents import make_pdf
from tests.servers import REPO, LoopbackProcess, wait_for

pytestmark = pytest.mark.slow

KEY = "sk_entry"


def _commands(port: int) -> dict[str, list[str]]:
    uvicorn_cli = shutil.which("uvicorn", path=str(Path(sys.executable).parent))
    dsocr_cli = shutil.which("dsocr", path=str(Path(sys.executable).parent))
    assert uvicorn_cli, "the venv's uvicorn command is installed"
    assert dsocr_cli, "the venv's dsocr command is installed (pip install -e .)"
    return {
        "uvicorn": [uvicorn_cli, "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        "python -m app": [sys.executable, "-m", "app"],
        "dsocr serve": [dsocr_cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
    }


def _environment(tiny_model_dir: Path, data_dir: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "APP_DATA_DIR": str(data_dir),
        "APP_DS_MODEL_PATH": str(tiny_model_dir),
        "APP_DS_DTYPE": "float32",
        "APP_DS_MAX_NEW_TOKENS": "16",
        "APP_API_KEYS": KEY,
        "APP_HOST": "127.0.0.1",  # `python -m app` listens where the settings say
        "APP_PORT": str(port),
        "APP_LOG_LEVEL": "warning",
    }


@pytest.mark.parametrize("command", ["uvicorn", "python -m app", "dsocr serve"])
def test_documented_command_serves_and_converts(command: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    server = LoopbackProcess(tmp_path / "server.log")
    server.spawn(
        _commands(server.port)[command],
        _environment(tiny_model_dir, tmp_path / "data", server.port),
        cwd=REPO,
    )
    try:
        server.wait_ready("/healthz", timeout=60)
        assert httpx.get(f"{server.url}/v1/tasks", timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            created = client.post("/v1/tasks/upload", files={"file": ("one.pdf", make_pdf(1))})
            assert created.status_code == 202, created.text
            task_id = created.json()["task_id"]
            view = wait_for(
                lambda: (
                    (v := client.get(f"/v1/tasks/{task_id}", params={"wait": 5}).json())["status"]
                    in ("succeeded", "failed", "canceled")
                    and v
                ),
                timeout=120,
            )
            assert view["status"] == "succeeded", view
            markdown = client.get(f"/v1/tasks/{task_id}/result.md")
            assert markdown.status_code == 200
            assert markdown.headers["content-type"].startswith("text/markdown")
    finally:
        server.stop()


def test_importing_the_app_module_reads_no_settings(tmp_path: Path) -> None:
    """An invalid setting breaks nothing on import; only building the app refuses it."""
    env = {**os.environ, "APP_PORT": "not-a-port", "APP_DATA_DIR": str(tmp_path)}
    imported = subprocess.run(
        [sys.executable, "-c", "import app.main, app.__main__"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr.decode()


def test_uvicorn_with_invalid_settings_exits_with_the_problem(tmp_path: Path) -> None:
    uvicorn_cli = shutil.which("uvicorn", path=str(Path(sys.executable).parent))
    assert uvicorn_cli
    env = {**os.environ, "APP_MAX_WORKERS": "0", "APP_DATA_DIR": str(tmp_path)}
    started = subprocess.run(
        [uvicorn_cli, "app.main:app", "--port", "0"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    assert started.returncode != 0
    stderr = started.stderr.decode()
    assert "settings are invalid" in stderr
    assert "greater than 0" in stderr
    assert "Traceback" not in stderr


def _readme_block_after(heading_words: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(heading_words)
    block = readme[readme.index("```bash\n", start) + len("```bash\n") :]
    return block[: block.index("```")].strip()


def test_ci_runs_exactly_the_readmes_test_command_in_debian() -> None:
    """`.ci/run` is the README's test command and nothing more; the workflow runs it on Debian,
    whose apt has the chromium, prometheus and redis-server debs the script installs."""
    command = _readme_block_after("Run the tests")
    assert command == "bash scripts/test.sh"
    lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', command]
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "docker.yml").read_text())
    test_job = workflow["jobs"]["test"]
    assert test_job["container"].split(":")[0] in ("python", "debian")
    assert "bookworm" in test_job["container"] or "trixie" in test_job["container"]
    assert [step["run"] for step in test_job["steps"] if "run" in step] == ["bash .ci/run"]


def test_readme_start_command_is_the_one_tested_here() -> None:
    start = _readme_block_after("Install and start the service")
    assert start.endswith("APP_API_KEYS=sk_test python -m app")
    assert "uvicorn app.main:app --host 0.0.0.0 --port 8000" in (REPO / "README.md").read_text()
