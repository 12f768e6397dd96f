"""Tenants (``APP_TENANTS_FILE``) through real servers: keys by hash, who sees which tasks, the
quotas at their limits and after their reset, the reload of the file (and a broken one), and the
quotas held across two API processes sharing Redis."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.tenants import Tenants, TenantsFileError
from tests.documents import make_pdf
from tests.servers import wait_for
from tests.sse import events_path
from tests.standins import StandInGpu
from tests.test_admission import event_stream
from tests.test_api_e2e import upload
from tests.test_events import MIB, held_server
from tests.test_shared_backends import shared_settings

SECRET = "whsec-acme-only-0123456789"


def hashed(key: str) -> str:
    """A key as the tenants file stores it, from the documented form: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def write_tenants(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"tenants": list(entries)}))
    return path


def tenant(name: str, *keys: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "keys": [hashed(key) for key in keys], **extra}


def settle(gpu: StandInGpu, *callers: httpx.Client) -> None:
    """Cancel the callers' tasks held by ``held_server``, then let the GPU go: the servers stop at
    once, with no worker waiting at the gate through the shutdown grace and nothing left to run."""
    for caller in callers:
        for view in caller.get("/v1/tasks", params={"limit": 100}).json()["tasks"]:
            if view["status"] in ("queued", "running"):
                caller.delete(f"/v1/tasks/{view['task_id']}")
    gpu.free_bytes = 8000 * MIB

    def settled() -> bool:
        views = [v for c in callers for v in c.get("/v1/tasks", params={"limit": 100}).json()["tasks"]]
        return all(v["status"] not in ("queued", "running") for v in views)

    wait_for(settled, timeout=30)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def clients(url: str, *keys: str) -> Iterator[list[httpx.Client]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(httpx.Client(base_url=url, headers=auth(k), timeout=60)) for k in keys]


def record_on_disk(data_dir: Path, task_id: str) -> dict[str, Any]:
    return json.loads((data_dir / "tasks" / task_id / "task.json").read_text())


def assert_quota_refusal(response: httpx.Response, limit: str, quota: int) -> tuple[int, int]:
    """A 429 naming ``limit``; returns the RateLimit field's remaining ``r`` and reset ``t``."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert limit in error["message"]
    # draft-ietf-httpapi-ratelimit-headers-10: a policy item named by a String, q (quota), w (window).
    policy = response.headers["ratelimit-policy"]
    assert policy.startswith(f'"{limit}";q={quota}')
    name, *params = response.headers["ratelimit"].split(";")
    assert name == f'"{limit}"'
    fields = dict(param.split("=", 1) for param in params)
    assert set(fields) == {"r", "t"}
    assert fields["t"] == response.headers["retry-after"]
    return int(fields["r"]), int(fields["t"])


# --- the file ----------------------------------------------------------------------------------


def test_the_file_gives_each_key_its_tenant_role_weight_and_limits(tmp_path):
    path = write_tenants(
        tmp_path / "tenants.yaml",
        tenant("acme", "sk_acme_1", "sk_acme_2", weight=3, webhook_secret=SECRET, limits={"queued_tasks": 2}),
        tenant("ops", "sk_ops", role="admin"),
    )
    tenants = Tenants(file=path, api_keys=("sk_plain",))
    acme, same, ops, plain = (tenants.by_key(k) for k in ("sk_acme_1", "sk_acme_2", "sk_ops", "sk_plain"))
    assert acme is not None
    assert acme == same
    assert (acme.name, acme.role, acme.weight, acme.limits.queued_tasks, acme.limits.pages_per_day) == (
        "acme",
        "user",
        3,
        2,
        None,
    )
    assert acme.webhook_secret is not None
    assert acme.webhook_secret.get_secret_value() == SECRET
    assert ops is not None
    assert (ops.role, ops.weight) == ("admin", 1)
    assert plain is not None
    assert plain.name.startswith("key-")
    assert plain.role == "user"
    assert tenants.by_key("sk_unknown") is None
    assert tenants.by_key(hashed("sk_acme_1")) is None  # the stored hash is not a key
    assert tenants.names() == tuple(sorted(("acme", "ops", plain.name)))
    assert (tenants.weight("acme"), tenants.weight(None), tenants.weight("gone")) == (3, 1, 1)
    # Owner ids are stable: another process (a restart) reading the same file agrees.
    again = Tenants(file=path, api_keys=("sk_plain",))
    assert [t.owner for t in map(again.by_key, ("sk_acme_1", "sk_plain"))] == [acme.owner, plain.owner]
    assert len({acme.owner, ops.owner, plain.owner}) == 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("tenants: [", "not valid YAML at line 1"),
        ("tenants:\n  - name: acme\n    keys: [sk_raw_key]\n", "tenant 'acme': keys.0"),
        (
            f"tenants:\n  - name: acme\n    keys: ['{hashed('a')}']\n    webhook_secret: {SECRET}\n"
            "    limts: {queued_tasks: 1}\n",
            "tenant 'acme': limts: Extra inputs are not permitted",
        ),
        (f"tenants:\n  - name: acme\n    keys: ['{hashed('a')}']\n    weight: 0\n", "tenant 'acme': weight"),
        (f"tenants:\n  - name: acme\n    keys: ['{hashed('a')}']\n    role: root\n", "tenant 'acme': role"),
        (
            f"tenants:\n  - name: acme\n    keys: ['{hashed('a')}']\n    limits: {{pages_per_day: -1}}\n",
            "tenant 'acme': limits.pages_per_day",
        ),
        (
            f"tenants:\n  - {{name: a, keys: ['{hashed('k')}']}}\n  - {{name: b, keys: ['{hashed('k')}']}}\n",
            "a key is also listed for another tenant",
        ),
        (f"tenants:\n  - {{name: b, keys: ['{hashed('sk_plain')}']}}\n", "a key is also listed"),
        (f"tenants:\n  - {{name: key-1, keys: ['{hashed('x')}']}}\n", "reserved"),
        (
            f"tenants:\n  - {{name: a, keys: ['{hashed('x')}']}}\n  - {{name: a, keys: ['{hashed('y')}']}}\n",
            "twice",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem_and_never_a_secret(tmp_path, content, reason):
    path = tmp_path / "tenants.yaml"
    path.write_text(content)
    with pytest.raises(TenantsFileError) as refused:
        Tenants(file=path, api_keys=("sk_plain",))
    assert reason in str(refused.value)
    assert str(path) in str(refused.value)
    assert SECRET not in str(refused.value)


def test_a_broken_file_at_start_up_ends_the_process_with_a_message(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  - name: acme\n    keys: [sk_raw_key]\n")
    env = {**os.environ, "APP_TENANTS_FILE": str(path), "APP_DATA_DIR": str(tmp_path / "data")}
    ended = subprocess.run(
        [sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert ended.returncode == 1
    assert "cannot start, the tenants file is invalid" in ended.stderr
    assert "tenant 'acme': keys.0" in ended.stderr
    assert "Traceback" not in ended.stderr


# --- keys and tasks ----------------------------------------------------------------------------


def test_every_key_of_a_tenant_sees_its_tasks_and_no_other_tenant_does(make_server, tmp_path):
    path = write_tenants(
        tmp_path / "t.yaml", tenant("acme", "sk_acme_1", "sk_acme_2"), tenant("beta", "sk_beta")
    )
    plain_task = None
    before = make_server(answers=["hi"], api_keys="sk_test")  # no file yet: a key of APP_API_KEYS
    plain_task = upload(before.client, make_pdf(1, picture_page=None)).json()["task_id"]

    server = make_server(answers=["hi"], api_keys="sk_test", tenants_file=path, data_dir=before.data_dir)
    with clients(server.url, "sk_acme_1", "sk_acme_2", "sk_beta") as (acme_1, acme_2, beta):
        created = upload(acme_1, make_pdf(1, picture_page=None))
        assert created.status_code == 202, created.text
        task_id = created.json()["task_id"]
        assert acme_2.get(f"/v1/tasks/{task_id}").status_code == 200
        assert [t["task_id"] for t in acme_2.get("/v1/tasks").json()["tasks"]] == [task_id]
        for other in (beta, server.client):  # another tenant, and a key of APP_API_KEYS
            assert other.get(f"/v1/tasks/{task_id}").status_code == 404
            assert other.delete(f"/v1/tasks/{task_id}").status_code == 404
            assert task_id not in [t["task_id"] for t in other.get("/v1/tasks").json()["tasks"]]
        # The task created before the file existed is still its key's, and no tenant's.
        assert server.client.get(f"/v1/tasks/{plain_task}").status_code == 200
        assert acme_1.get(f"/v1/tasks/{plain_task}").status_code == 404
    assert record_on_disk(server.data_dir, task_id)["tenant"] == "acme"
    unknown = httpx.get(f"{server.url}/v1/tasks", headers=auth(hashed("sk_acme_1")))
    assert unknown.status_code == 401  # the hash in the file is not a key


# --- quotas ------------------------------------------------------------------------------------


def test_queued_tasks_are_refused_at_the_limit_and_admitted_once_one_leaves(
    make_server, standin_gpu, tmp_path
):
    path = write_tenants(
        tmp_path / "t.yaml", tenant("acme", "sk_acme", limits={"queued_tasks": 2}), tenant("beta", "sk_beta")
    )
    server = held_server(make_server, standin_gpu, tenants_file=path)
    document = make_pdf(1, picture_page=None)
    with clients(server.url, "sk_acme", "sk_beta") as (acme, beta):
        first, _ = (upload(acme, document).json()["task_id"] for _ in range(2))
        stored = server.task_dirs()
        refused = upload(acme, document)
        remaining, _ = assert_quota_refusal(refused, "queued_tasks", 2)
        assert remaining == 0
        assert "ratelimit-policy" in refused.headers
        assert ";w=" not in refused.headers["ratelimit-policy"]
        assert server.task_dirs() == stored  # nothing stored, nothing spooled
        assert server.spool_files() == []
        assert upload(beta, document).status_code == 202  # another tenant is not held by acme's limit
        assert acme.delete(f"/v1/tasks/{first}").status_code == 200  # one leaves the queue...
        assert upload(acme, document).status_code == 202  # ...and its place is free again
        assert_quota_refusal(upload(acme, document), "queued_tasks", 2)
        settle(standin_gpu, acme, beta)


def test_pages_per_day_are_refused_past_the_limit_until_the_next_utc_day(make_server, standin_gpu, tmp_path):
    path = write_tenants(tmp_path / "t.yaml", tenant("acme", "sk_acme", limits={"pages_per_day": 3}))
    server = held_server(make_server, standin_gpu, tenants_file=path)
    quotas = server.app.state.quotas
    today = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)
    quotas.clock = today.timestamp
    with clients(server.url, "sk_acme") as (acme,):
        assert upload(acme, make_pdf(2, picture_page=None)).status_code == 202
        stored = server.task_dirs()
        refused = upload(acme, make_pdf(3, picture_page=None), pages="1-2")  # the selection counts
        remaining, reset = assert_quota_refusal(refused, "pages_per_day", 3)
        assert (remaining, reset) == (1, 3600)  # one page left; midnight UTC in an hour
        assert refused.headers["ratelimit-policy"] == '"pages_per_day";q=3;w=86400'
        assert server.task_dirs() == stored
        assert upload(acme, make_pdf(3, picture_page=None), pages="3").status_code == 202  # 3 of 3
        assert_quota_refusal(upload(acme, make_pdf(1, picture_page=None)), "pages_per_day", 3)
        quotas.clock = (today + timedelta(hours=1, seconds=1)).timestamp  # the next UTC day
        assert upload(acme, make_pdf(3, picture_page=None)).status_code == 202
        settle(standin_gpu, acme)


def test_a_tenant_s_upload_and_page_limits_replace_the_global_ones(make_server, tmp_path):
    path = write_tenants(
        tmp_path / "t.yaml",
        tenant("small", "sk_small", limits={"max_upload_mb": 1, "max_pages": 1}),
        tenant("big", "sk_big"),
    )
    server = make_server(answers=["hi"], tenants_file=path, max_upload_mb=5)
    large = make_pdf(1, picture_page=None) + b"%" * (2 * MIB)  # 2 MiB: past 1, within 5
    with clients(server.url, "sk_small", "sk_big") as (small, big):
        refused = upload(small, large)
        assert refused.status_code == 413, refused.text
        assert "max_upload_mb=1 of tenant 'small'" in refused.json()["error"]["message"]
        too_many = upload(small, make_pdf(2, picture_page=None))
        assert too_many.status_code == 422
        assert "tenant 'small' may submit at most 1 pages" in too_many.json()["error"]["message"]
        assert server.task_dirs() == []
        assert server.spool_files() == []
        assert upload(big, large).status_code == 202
        assert upload(big, make_pdf(2, picture_page=None)).status_code == 202


def test_a_tenant_s_event_streams_are_capped_at_its_own_limit(make_server, standin_gpu, tmp_path):
    path = write_tenants(
        tmp_path / "t.yaml", tenant("acme", "sk_acme_1", "sk_acme_2", limits={"event_streams": 1})
    )
    server = held_server(make_server, standin_gpu, tenants_file=path, max_streams_per_key=10)
    with clients(server.url, "sk_acme_1", "sk_acme_2") as (one, two):
        task_id = upload(one, make_pdf(1, picture_page=None)).json()["task_id"]
        with event_stream(one, task_id):
            refused = two.get(events_path(task_id))  # the other key: the same tenant, the same count
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert "tenant 'acme'" in refused.json()["error"]["message"]
            assert refused.headers["ratelimit-policy"] == '"event_streams";q=1'
            assert refused.headers["ratelimit"] == '"event_streams";r=0;t=5'
        # The slot comes back when the stream closes: a long-poll (counted alike) is admitted again.
        wait_for(
            lambda: two.get(f"/v1/tasks/{task_id}", params={"wait": 0.01}).status_code == 200, timeout=10
        )
        settle(standin_gpu, one)


# --- reload ------------------------------------------------------------------------------------


def test_the_file_is_reloaded_and_a_broken_one_keeps_the_last_good_one(make_server, tmp_path):
    path = write_tenants(tmp_path / "t.yaml", tenant("acme", "sk_acme"))
    server = make_server(answers=["hi"], api_keys="", tenants_file=path, tenants_poll_seconds=0.1)
    with clients(server.url, "sk_acme", "sk_new") as (acme, new):
        assert acme.get("/v1/tasks").status_code == 200
        assert new.get("/v1/tasks").status_code == 401
        write_tenants(path, tenant("acme", "sk_acme"), tenant("new", "sk_new"))
        wait_for(lambda: new.get("/v1/tasks").status_code == 200, timeout=5)  # within a few polls

        path.write_text("tenants:\n  - name: acme\n    keys: [sk_in_clear]\n")  # broken
        wait_for(lambda: acme.get("/readyz").json()["tenants"]["file_ok"] is False, timeout=5)
        ready = acme.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert "tenant 'acme': keys.0" in ready.json()["tenants"]["error"]
        anonymous = httpx.get(f"{server.url}/readyz").json()["tenants"]
        assert anonymous == {"file_ok": False}  # the details name tenants: for key holders only
        assert new.get("/v1/tasks").status_code == 200
        assert acme.get("/v1/tasks").status_code == 200

        write_tenants(path, tenant("acme", "sk_acme"))  # fixed: "new" is gone
        wait_for(lambda: new.get("/v1/tasks").status_code == 401, timeout=5)
        assert acme.get("/readyz").json()["tenants"] == {"file_ok": True, "error": None}


# --- across API processes sharing Redis ---------------------------------------------------------


def test_quotas_hold_across_two_api_processes_sharing_redis(
    make_server, standin_gpu, redis_server, s3, tmp_path
):
    path = write_tenants(
        tmp_path / "t.yaml",
        tenant("acme", "sk_acme", limits={"queued_tasks": 3}),
        tenant("beta", "sk_beta", limits={"pages_per_day": 4}),
    )
    shared = shared_settings(redis_server, s3, tenants_file=path)
    one = held_server(make_server, standin_gpu, **shared)
    two = held_server(make_server, standin_gpu, **shared)
    document = make_pdf(1, picture_page=None)
    with (
        clients(one.url, "sk_acme", "sk_beta") as (acme_1, beta_1),
        clients(two.url, "sk_acme", "sk_beta") as (
            acme_2,
            beta_2,
        ),
    ):
        # Eight submits at once, alternating between the processes: exactly three get in.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: upload((acme_1, acme_2)[i % 2], document), range(8)))
        assert sorted(a.status_code for a in answers) == [202] * 3 + [429] * 5
        for refused in (a for a in answers if a.status_code == 429):
            assert_quota_refusal(refused, "queued_tasks", 3)
        assert len(acme_2.get("/v1/tasks").json()["tasks"]) == 3

        assert upload(beta_1, make_pdf(2, picture_page=None)).status_code == 202
        assert upload(beta_2, make_pdf(2, picture_page=None)).status_code == 202
        remaining, _ = assert_quota_refusal(upload(beta_1, document), "pages_per_day", 4)
        assert remaining == 0
        assert_quota_refusal(upload(beta_2, document), "pages_per_day", 4)
        settle(standin_gpu, acme_1, beta_1)
