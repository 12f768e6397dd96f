"""What an unconfigured service exposes: without API keys it says so (a start-up warning, ``/readyz``)
and listens on loopback unless ``APP_HOST`` says otherwise; ``/readyz`` shows the model and engine
only to a caller with a key. The start-up is ``python -m app`` in its own process, as users run it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import socket
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app.config import Settings
from tests.documents import make_pdf
from tests.servers import REPO, LoopbackProcess
from tests.test_api_e2e import PAGE_1, finished, upload
from tests.test_deploy import DOCKERFILES, final_stage

PROBE_FIELDS = {"status", "role", "auth", "workers", "storage_writable", "queue_depth"}
AUTH_WARNING = "APP_API_KEYS is empty: authentication is DISABLED"


# --- /readyz ------------------------------------------------------------------------------------


def assert_probe_only(base_url: str, *hidden: str) -> None:
    """``/readyz`` without a valid key: the probe's fields, none of ``hidden``, the same status."""
    with httpx.Client(base_url=base_url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer sk_wrong"}, {"Authorization": "Basic c2tfb25lOg=="}):
            probe = anonymous.get("/readyz", headers=headers)
            assert probe.status_code == 200
            assert set(probe.json()) == PROBE_FIELDS
            assert probe.json()["auth"] == "enabled"
            assert not [text for text in hidden if text in probe.text]


def test_readyz_shows_the_model_and_its_load_error_only_to_a_caller_with_a_key(make_server, tmp_path):
    server = make_server(default_engine=True, ds_model_path=str(tmp_path / "private-model-dir"))
    task_id = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    assert finished(server.client, task_id)["error"]["code"] == "model_unavailable"
    keyed = server.client.get("/readyz")
    assert set(keyed.json()) == PROBE_FIELDS | {"model"}
    assert "private-model-dir" in keyed.json()["model"]["last_error"]
    assert_probe_only(server.url, "private-model-dir", "last_error")


def test_readyz_shows_the_engine_server_only_to_a_caller_with_a_key(make_server):
    server = make_server(default_engine=True, backend="vllm", vllm_url="http://127.0.0.1:9/private-engine")
    keyed = server.client.get("/readyz").json()
    assert keyed["model"]["server"]["url"] == "http://127.0.0.1:9/private-engine"
    assert keyed["model"]["server"]["reachable"] is False
    assert_probe_only(server.url, "private-engine", "127.0.0.1:9")


def test_readyz_says_auth_is_disabled_and_keeps_its_status_code(make_server):
    server = make_server(answers=[PAGE_1], api_keys="")
    with httpx.Client(base_url=server.url) as anonymous:
        ready = anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["auth"] == "disabled"
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"]["loaded"] is False  # open: nothing to hide from anyone


# --- where `python -m app` listens ----------------------------------------------------------------


def test_host_defaults_to_loopback_without_keys_and_is_used_as_given(monkeypatch) -> None:
    for name in [name for name in os.environ if name.startswith("APP_")]:
        monkeypatch.delenv(name)
    assert Settings(_env_file=None).listen_host == "127.0.0.1"
    assert Settings(_env_file=None, api_keys="sk_a").listen_host == "0.0.0.0"
    assert Settings(_env_file=None, host="", api_keys="sk_a").listen_host == "0.0.0.0"  # blank: unset
    assert Settings(_env_file=None, host="0.0.0.0").listen_host == "0.0.0.0"
    assert Settings(_env_file=None, host="::1", api_keys="sk_a").listen_host == "::1"


def this_machines_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one."""
    candidates: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
        candidates.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):  # no route, or a name that does not resolve: none found
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    return next((a for a in candidates if not ipaddress.ip_address(a).is_loopback), None)


def start_service(tmp_path: Path, tiny_model_dir: Path, **settings: str) -> LoopbackProcess:
    """``python -m app`` with only the given ``APP_*`` settings (beyond data and model) set."""
    server = LoopbackProcess(tmp_path / "server.log")
    env = {name: value for name, value in os.environ.items() if not name.startswith("APP_")}
    env |= {
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_DS_MODEL_PATH": str(tiny_model_dir),
        "APP_DS_DTYPE": "float32",
        "APP_PORT": str(server.port),
        "APP_LOG_LEVEL": "info",
        **settings,
    }
    server.spawn([sys.executable, "-m", "app"], env, cwd=REPO)
    server.wait_ready("/healthz", timeout=90)
    return server


def reachable(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


@pytest.mark.slow
def test_without_keys_it_warns_once_and_listens_on_loopback_only(tmp_path, tiny_model_dir):
    server = start_service(tmp_path, tiny_model_dir)
    try:
        log = server.log_tail()
        assert log.count(AUTH_WARNING) == 1
        assert "listening on 127.0.0.1 only" in log
        assert "APP_HOST=0.0.0.0" in log  # how to serve other machines anyway
        assert f"Uvicorn running on http://127.0.0.1:{server.port}" in log
        assert httpx.get(f"{server.url}/readyz", timeout=10).json()["auth"] == "disabled"
        address = this_machines_address()
        if address is not None:  # from another machine's point of view: nobody listens there
            assert not reachable(address, server.port)
    finally:
        server.stop()


@pytest.mark.slow
def test_with_keys_it_listens_on_every_interface_without_the_warning(tmp_path, tiny_model_dir):
    server = start_service(tmp_path, tiny_model_dir, APP_API_KEYS="sk_exposed")
    try:
        log = server.log_tail()
        assert AUTH_WARNING not in log
        assert f"Uvicorn running on http://0.0.0.0:{server.port}" in log
        address = this_machines_address()
        if address is not None:
            with httpx.Client(base_url=f"http://{address}:{server.port}", trust_env=False) as remote:
                assert remote.get("/healthz").status_code == 200
                assert remote.get("/v1/tasks").status_code == 401
                assert remote.get("/readyz").json()["auth"] == "enabled"
    finally:
        server.stop()


@pytest.mark.slow
def test_an_explicit_host_wins_over_the_default(tmp_path, tiny_model_dir):
    server = start_service(tmp_path, tiny_model_dir, APP_API_KEYS="sk_exposed", APP_HOST="127.0.0.1")
    try:
        log = server.log_tail()
        assert f"Uvicorn running on http://127.0.0.1:{server.port}" in log
        assert "APP_HOST is unset" not in log
        address = this_machines_address()
        if address is not None:
            assert not reachable(address, server.port)
    finally:
        server.stop()


# --- the images and compose files keep listening on every interface -------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_image_sets_app_host_explicitly(dockerfile: str) -> None:
    stage = final_stage(dockerfile)
    env = dict(
        pair.split("=", 1) for args in (a for i, a in stage if i == "ENV") for pair in shlex.split(args)
    )
    assert env["APP_HOST"] == "0.0.0.0"


def test_each_compose_service_of_the_image_sets_app_host() -> None:
    ours = {
        f"{compose.name}:{name}": service
        for compose in REPO.glob("docker-compose*.yml")
        for name, service in yaml.safe_load(compose.read_text())["services"].items()
        if str(service.get("image", "")).startswith("dsocr-server")
    }
    expected = {"docker-compose.cpu.yml:dsocr", "docker-compose.vllm.yml:dsocr"}
    assert expected | {"docker-compose.scale.yml:api", "docker-compose.scale.yml:worker"} <= set(ours)
    for name, service in ours.items():
        assert service["environment"]["APP_HOST"] == "0.0.0.0", name
