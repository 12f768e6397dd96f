"""Deployment files, checked without Docker or a cluster: images, compose, Helm chart, workflow, monitoring.

Every validator is a real tool pinned in requirements-dev.txt (promtool is Debian's, from .ci/run).
A missing one fails its test instead of skipping it: CI must not pass by checking nothing.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any, get_args
from urllib.parse import urlsplit

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr

from app.api.tasks import CONVERT_MAX_WAIT_SECONDS
from app.api.tasks import router as tasks_router
from app.config import Settings
from app.tasks.redis_queue import HELD_COUNT, WAITING_COUNT
from app.tenants import Tenants, hash_key
from tests.servers import REPO, free_port

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.vllm")
COMPOSE_COMBINATIONS = {
    "cpu": ("docker-compose.cpu.yml",),
    "cpu+monitoring": ("docker-compose.cpu.yml", "docker-compose.monitoring.yml"),
    "vllm": ("docker-compose.vllm.yml",),
    "vllm+monitoring": ("docker-compose.vllm.yml", "docker-compose.monitoring.yml"),
}
SCALE_COMPOSE = "docker-compose.scale.yml"
SCALE_MONITORING_COMPOSE = "docker-compose.scale-monitoring.yml"
NGINX_CONFIG = REPO / "deploy" / "compose" / "nginx.conf"
CHART = REPO / "deploy" / "helm" / "dsocr"
WORKFLOW = REPO / ".github" / "workflows" / "docker.yml"
PROMETHEUS_CONFIG = REPO / "monitoring" / "prometheus.yml"
SCALE_PROMETHEUS_CONFIG = REPO / "monitoring" / "prometheus.scale.yml"
GRAFANA = REPO / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dsocr-overview.json"
# vLLM's DeepSeek-OCR recipe: its n-gram logits processor, no prefix or multimodal caching.
VLLM_RECOMMENDED_FLAGS = (
    "--logits_processors",
    "vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor",
    "--no-enable-prefix-caching",
    "--mm-processor-cache-gb",
)

SETTINGS = {f"APP_{name.upper()}" for name in Settings.model_fields}
# Settings a chart must take from a Secret, never from values.yaml.
SECRET_SETTINGS = {
    f"APP_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if SecretStr in (field.annotation, *get_args(field.annotation))
} | {"APP_API_KEYS"}


def tool(name: str) -> str:
    """A validator's binary: the virtual environment's own, else the system's."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.fail(
            f"{name} is missing: `pip install -r requirements-dev.txt`, and .ci/run installs promtool"
        )
    return found


def run(name: str, *args: str | Path) -> str:
    result = subprocess.run(
        [tool(name), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- images --------------------------------------------------------------------------------------


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), comments dropped, continuations joined."""
    lines = [
        line for line in (REPO / dockerfile).read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    start = max(i for i, (instruction, _) in enumerate(steps) if instruction == "FROM")
    return steps[start:]


def healthcheck_command(dockerfile: str) -> list[str]:
    (arguments,) = [args for instruction, args in final_stage(dockerfile) if instruction == "HEALTHCHECK"]
    return json.loads(arguments.split(" CMD ", 1)[1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    run("hadolint", dockerfile)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_as_a_non_root_user_with_data_in_a_volume(dockerfile: str) -> None:
    stage = final_stage(dockerfile)
    env = dict(
        pair.split("=", 1) for args in (a for i, a in stage if i == "ENV") for pair in shlex.split(args)
    )
    assert ("USER", "10001:10001") in stage  # numeric: runAsNonRoot can verify it
    assert ("VOLUME", '["/data"]') in stage
    assert env["APP_DATA_DIR"] == "/data"
    assert env["HF_HOME"].startswith("/data/")  # downloaded weights survive the container
    assert ("EXPOSE", "8000") in stage
    assert "/healthz" in healthcheck_command(dockerfile)[-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_code_edits_do_not_reinstall_dependencies(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    code = steps.index(("COPY", "app/ app/"))
    installs = [i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install -r" in args]
    assert installs, "no `pip install -r` step"
    assert max(installs) < code
    # Only what .dockerignore lets into the build context may be copied (it is an allowlist).
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    copied = {args.split()[0].rstrip("/") for ins, args in steps if ins == "COPY" and "--from" not in args}
    assert copied <= allowed


def test_images_are_built_for_their_targets() -> None:
    cpu, gpu, vllm = (instructions(name) for name in DOCKERFILES)
    cpu_torch = next(args for ins, args in cpu if ins == "RUN" and "torch==" in args)
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_torch
    assert "torchvision" not in (REPO / "Dockerfile.cpu").read_text()
    assert final_stage("Dockerfile.gpu")[0][1].startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
    assert any(ins == "ARG" and args.startswith("FLASH_ATTN_VERSION=") for ins, args in gpu)
    assert final_stage("Dockerfile.vllm")[0] == ("FROM", "vllm/vllm-openai:${VLLM_VERSION}")
    assert any(ins == "ENV" and "APP_BACKEND=vllm" in args.split() for ins, args in vllm)


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution pip installs for ``requirements``, read from the installed metadata."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        extras = {"", *requirement.extras}
        for raw in importlib.metadata.distribution(name).requires or ():
            dependency = Requirement(raw)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dependency)
    return seen


def test_requirements_do_not_pull_torchvision() -> None:
    # The CPU image installs requirements.txt as it is: torchvision would arrive through a dependency.
    lines = (REPO / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    closure = dependency_closure(requirements)
    assert "torch" in closure
    assert "torchvision" not in closure


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_healthcheck_probes_healthz(dockerfile: str, make_server) -> None:
    command = [sys.executable, *healthcheck_command(dockerfile)[1:]]

    def probe(port: str) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "APP_PORT": port}
        return subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)

    up = probe(make_server().url.rsplit(":", 1)[1])
    assert up.returncode == 0, up.stderr
    assert probe(str(free_port())).returncode != 0  # nothing listens there


# --- compose -------------------------------------------------------------------------------------


def compose_config(files: tuple[str, ...]) -> dict[str, Any]:
    return json.loads(
        run("docker-compose", *(a for f in files for a in ("-f", f)), "config", "--format", "json")
    )


@pytest.mark.parametrize("files", COMPOSE_COMBINATIONS.values(), ids=COMPOSE_COMBINATIONS.keys())
def test_compose_combination_is_valid(files: tuple[str, ...]) -> None:
    services = compose_config(files)["services"]
    dsocr = services["dsocr"]
    port = int(dsocr["environment"]["APP_PORT"])
    assert dsocr["environment"]["APP_DATA_DIR"] == "/data"
    assert {"type": "volume", "target": "/data"}.items() <= dsocr["volumes"][0].items()
    assert [p["target"] for p in dsocr["ports"]] == [port]
    if "docker-compose.vllm.yml" in files:
        vllm = services["vllm"]
        assert dsocr["environment"]["APP_BACKEND"] == "vllm"
        assert dsocr["environment"]["APP_VLLM_URL"] == "http://vllm:8000"  # vllm serve's default port
        assert vllm["command"][0] == dsocr["environment"]["APP_VLLM_MODEL"] == "deepseek-ai/DeepSeek-OCR"
        assert set(VLLM_RECOMMENDED_FLAGS) <= set(vllm["command"])
        max_num_seqs = vllm["command"][vllm["command"].index("--max-num-seqs") + 1]
        assert dsocr["environment"]["APP_VLLM_CONCURRENCY"] == max_num_seqs  # see README's "Run with vLLM"
        assert dsocr["depends_on"]["vllm"]["condition"] == "service_healthy"
        # A fixed cap (8192) plus the prompt exceeds DeepSeek-OCR's 8192-token context, and vLLM
        # refuses such a request: the service derives the cap from the server's max_model_len.
        assert "APP_VLLM_MAX_TOKENS" not in dsocr["environment"]
        vllm_version = next(
            a for i, a in instructions("Dockerfile.vllm") if i == "ARG" and "VLLM_VERSION=" in a
        )
        assert vllm["image"] == f"vllm/vllm-openai:{vllm_version.split('=', 1)[1]}"
    if "docker-compose.monitoring.yml" in files:
        scrape = check_monitoring_wiring(services, PROMETHEUS_CONFIG)
        assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"dsocr:{port}"]


def check_monitoring_wiring(services: dict[str, Any], config: Path) -> dict[str, Any]:
    """Prometheus runs ``config`` (returned, loaded); Grafana finds Prometheus, provisioning, dashboard."""
    prometheus, grafana = services["prometheus"], services["grafana"]
    mounts = {
        m["target"]: Path(m["source"])
        for s in (prometheus, grafana)
        for m in s["volumes"]
        if m["type"] == "bind"
    }
    assert all(source.exists() for source in mounts.values())
    assert mounts["/etc/prometheus/prometheus.yml"] == config
    scrape = load_yaml(config)

    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert [p["target"] for p in prometheus["ports"]] == [9090]
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dsocr.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == DASHBOARD
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert [p["target"] for p in grafana["ports"]] == [3000]
    assert "prometheus" in grafana["depends_on"]
    return scrape


def settings_from_environment(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    """The Settings a process started with ``environment`` (and nothing else) reads; its validators run."""
    monkeypatch.chdir(tmp_path)  # no .env
    for name in [name for name in os.environ if name.startswith("APP_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()


# What docker-compose.scale.yml cannot start without: MinIO's password, and the one key every replica
# signs share links with (unset, each process draws its own and refuses the others' links).
SCALE_COMPOSE_SECRETS = {
    "MINIO_ROOT_PASSWORD": "compose-test-password",
    "APP_LINK_SECRET": "compose-link-key",
}


def scale_compose_config(secrets: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``docker compose -f docker-compose.scale.yml config`` with ``secrets`` as the only variables set."""
    empty = tmp_path / "empty.env"  # instead of a developer's .env, which may set them
    empty.write_text("")
    environment = {k: v for k, v in os.environ.items() if k not in SCALE_COMPOSE_SECRETS} | secrets
    return subprocess.run(
        [tool("docker-compose"), "--env-file", str(empty), "-f", SCALE_COMPOSE, "config", "--format", "json"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("missing", SCALE_COMPOSE_SECRETS)
def test_scale_compose_refuses_to_start_without_its_secrets(missing: str, tmp_path: Path) -> None:
    given = {k: v for k, v in SCALE_COMPOSE_SECRETS.items() if k != missing}
    result = scale_compose_config(given, tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr

    result = scale_compose_config(SCALE_COMPOSE_SECRETS, tmp_path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    # Every process that signs links (the API replicas, and the workers for published links) has the key.
    for name in ("api", "worker"):
        assert services[name]["environment"]["APP_LINK_SECRET"] == SCALE_COMPOSE_SECRETS["APP_LINK_SECRET"]


def test_scale_compose_wires_api_replicas_workers_redis_and_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SCALE_COMPOSE_SECRETS.items():
        monkeypatch.setenv(name, value)
    run("docker-compose", "-f", SCALE_COMPOSE, "config", "-q")
    services = compose_config((SCALE_COMPOSE,))["services"]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on {dependency}, which is no service"
            if how["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck", {}).get("test"), (
                    f"{dependency}: no healthcheck"
                )
            elif how["condition"] == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", f"{dependency} is a one-shot job"
    long_running = {name for name, service in services.items() if service.get("restart") != "no"}
    assert all(services[name].get("healthcheck", {}).get("test") for name in long_running)
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"lb"}, "only the load balancer is reached from outside"

    api, worker = services["api"], services["worker"]
    assert api["environment"]["APP_ROLE"] == "api"
    assert worker["environment"]["APP_ROLE"] == "worker"
    assert api["deploy"]["replicas"] >= 2
    assert worker["deploy"]["replicas"] >= 1
    bucket = api["environment"]["APP_S3_BUCKET"]
    for service in (api, worker):
        environment = service["environment"]
        settings = settings_from_environment(environment, monkeypatch, tmp_path)  # validators accept it
        assert (settings.queue_backend, settings.storage_backend) == ("redis", "s3")
        assert settings.s3_bucket == bucket
        assert urlsplit(settings.redis_url).hostname == "redis"
        assert urlsplit(settings.s3_endpoint_url).hostname == "minio"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"

    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"  # queued tasks survive a restart
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    major = re.match(r"redis:(\d+)", redis["image"])
    assert major is not None
    assert int(major.group(1)) >= 7  # consumer-group lag (XINFO GROUPS), KEDA's lag trigger

    minio, bucket_job = services["minio"], services["minio-bucket"]
    assert minio["environment"]["MINIO_ROOT_USER"] == api["environment"]["APP_S3_ACCESS_KEY_ID"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == api["environment"]["APP_S3_SECRET_ACCESS_KEY"]
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in minio["volumes"])
    assert bucket_job["environment"]["S3_BUCKET"] == bucket
    assert "mc mb --ignore-existing" in " ".join(bucket_job["command"])
    assert bucket_job["depends_on"]["minio"]["condition"] == "service_healthy"

    vllm = services["vllm"]
    assert set(VLLM_RECOMMENDED_FLAGS) <= set(vllm["command"])
    assert worker["environment"]["APP_BACKEND"] == "vllm"
    assert worker["environment"]["APP_VLLM_URL"] == "http://vllm:8000"
    assert worker["environment"]["APP_VLLM_MODEL"] == vllm["command"][0] == "deepseek-ai/DeepSeek-OCR"
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "APP_VLLM_MAX_TOKENS" not in worker["environment"]  # derived from the server's context
    max_num_seqs = int(vllm["command"][vllm["command"].index("--max-num-seqs") + 1])
    # The workers together fill the server's batch, as one service does in docker-compose.vllm.yml.
    assert worker["deploy"]["replicas"] * int(worker["environment"]["APP_VLLM_CONCURRENCY"]) == max_num_seqs
    with_gpu = {
        name for name, s in services.items() if s.get("deploy", {}).get("resources", {}).get("reservations")
    }
    assert with_gpu == {"vllm"}
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    check_load_balancer(services["lb"], port=int(api["environment"]["APP_PORT"]))


def waits_for(services: dict[str, Any], name: str) -> set[str]:
    """Every service that ``name`` waits for, directly or through another one."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for dependency in services[todo.pop()].get("depends_on", {}):
            if dependency not in found:
                found.add(dependency)
                todo.append(dependency)
    return found


def test_scale_compose_with_monitoring_scrapes_every_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SCALE_COMPOSE_SECRETS.items():
        monkeypatch.setenv(name, value)
    files = (SCALE_COMPOSE, SCALE_MONITORING_COMPOSE)
    run("docker-compose", *(a for f in files for a in ("-f", f)), "config", "-q")
    services = compose_config(files)["services"]
    scrape = check_monitoring_wiring(services, SCALE_PROMETHEUS_CONFIG)

    # The service's processes (the API replicas and the workers) each answer /metrics on APP_PORT.
    dsocr = {name: s for name, s in services.items() if "APP_ROLE" in s.get("environment", {})}
    assert set(dsocr) == {"api", "worker"}
    # One job per service (the job label tells them apart, as the chart's ServiceMonitor does), and
    # nothing else: not the load balancer, which would show one replica at a time.
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == set(dsocr)
    for name, job in jobs.items():
        assert job["metrics_path"] == "/metrics"
        assert "static_configs" not in job
        # Type A on the service's name: Docker's embedded DNS answers with every replica's address,
        # so each replica is a target, and `--scale` changes show up at the next refresh.
        (discovery,) = job["dns_sd_configs"]
        assert discovery["names"] == [name]
        assert discovery["type"] == "A"
        assert discovery["port"] == int(dsocr[name]["environment"]["APP_PORT"])
        assert discovery["refresh_interval"] == scrape["global"]["scrape_interval"]
        # The queue and worker metrics carry the process's own `role`: a target label of that name
        # would push it aside (exported_role).
        assert all(rule.get("target_label") != "role" for rule in job.get("relabel_configs", []))

    # Prometheus starts with the API replicas, not after vLLM's first start (up to 30 min): the
    # workers wait for it, and DNS finds them when they come up.
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["depends_on"]["api"]["condition"] == "service_started"
    assert "vllm" not in waits_for(services, "prometheus")
    assert "vllm" not in waits_for(services, "grafana")
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"lb", "prometheus", "grafana"}
    # The single-process overlay's two services, only the Prometheus configuration differs.
    single = compose_config(COMPOSE_COMBINATIONS["cpu+monitoring"])["services"]
    for name, service in (("prometheus", prometheus), ("grafana", grafana)):
        for key in ("image", "command", "environment", "ports", "restart"):
            assert service.get(key) == single[name].get(key), f"{name}: {key}"
        assert [v for v in service["volumes"] if v["type"] == "volume"] == [
            v for v in single[name]["volumes"] if v["type"] == "volume"
        ]


def nginx_directives(text: str) -> list[tuple[str, list[str], list[Any]]]:
    """An nginx configuration as nested (name, arguments, block) tuples: enough to check its wiring."""
    tokens = re.findall(r"\"[^\"]*\"|'[^']*'|[{};]|[^\s{};\"']+", re.sub(r"#[^\n]*", "", text))

    def block(position: int) -> tuple[list[tuple[str, list[str], list[Any]]], int]:
        directives: list[tuple[str, list[str], list[Any]]] = []
        words: list[str] = []
        while position < len(tokens):
            token, position = tokens[position], position + 1
            if token == ";":
                directives.append((words[0], words[1:], []))
                words = []
            elif token == "{":
                children, position = block(position)
                directives.append((words[0], words[1:], children))
                words = []
            elif token == "}":
                return directives, position
            else:
                words.append(token.strip("\"'"))
        assert not words, "unterminated directive"
        return directives, position

    return block(0)[0]


def nginx_size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else int(value)


def check_load_balancer(lb: dict[str, Any], port: int) -> None:
    """nginx reaches every API replica, streams events unbuffered and takes the largest upload."""
    (mount,) = [m for m in lb["volumes"] if m["type"] == "bind"]
    assert Path(mount["source"]) == NGINX_CONFIG
    assert mount["target"] == "/etc/nginx/conf.d/default.conf"
    config = nginx_directives(NGINX_CONFIG.read_text())
    upstreams = {args[0]: block for name, args, block in config if name == "upstream"}
    (server,) = [block for name, _, block in config if name == "server"]
    ((upstream_name, upstream),) = upstreams.items()
    assert [args[0] for name, args, _ in upstream if name == "server"] == [f"api:{port}"]
    assert [args for name, args, _ in server if name == "listen"] == [[str(lb["ports"][0]["target"])]]
    directives = {name: args for name, args, _ in server if name != "location"}
    default_upload_mb = Settings.model_fields["max_upload_mb"].default
    assert nginx_size(directives["client_max_body_size"][0]) > default_upload_mb * 1024 * 1024
    assert int(directives["proxy_read_timeout"][0].rstrip("s")) > CONVERT_MAX_WAIT_SECONDS
    locations = {tuple(args): block for name, args, block in server if name == "location"}
    for block in locations.values():
        assert ("proxy_pass", [f"http://{upstream_name}"], []) in block
    (events_path,) = [
        r.path for r in tasks_router.routes if isinstance(r, APIRoute) and r.path.endswith("/events")
    ]
    streaming = [
        block
        for args, block in locations.items()
        if args[0] == "~" and re.search(args[1], events_path.replace("{task_id}", "3f2a9c"))
    ]
    assert len(streaming) == 1, f"no location for {events_path}"
    assert ("proxy_buffering", ["off"], []) in streaming[0]


# --- settings, documented everywhere ---------------------------------------------------------------


def env_example() -> dict[str, str]:
    """The settings .env.example lists, as uncommenting every one of them would set them."""
    return dict(re.findall(r"^# (APP_[A-Z0-9_]+)=(.*)$", (REPO / ".env.example").read_text(), re.M))


def chart_values() -> dict[str, Any]:
    return load_yaml(CHART / "values.yaml")


def env_name(camel: str) -> str:
    return "APP_" + re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def test_env_example_and_chart_cover_every_setting() -> None:
    assert set(env_example()) == SETTINGS
    values = chart_values()
    plain, secret = ({env_name(key) for key in values[group]} for group in ("settings", "secretSettings"))
    keyed = {"auth": {"apiKeys": ["sk_a"]}, **TENANTS}
    from_chart = {v["name"] for v in container(render(keyed))["env"]} - plain - secret
    assert from_chart == {"APP_HOST", "APP_PORT", "APP_DATA_DIR", "APP_API_KEYS", "APP_TENANTS_FILE"}
    # Scale-out: the chart also sets each pod's role and the shared queue and storage.
    scaled = {"APP_ROLE", "APP_QUEUE_BACKEND", "APP_STORAGE_BACKEND", "APP_REDIS_URL"}
    for deployment in deployments(render_documents({**SCALE_OUT_VARIANTS["scale-out"], **TENANTS})).values():
        (main,) = deployment["spec"]["template"]["spec"]["containers"]
        assert {v["name"] for v in main["env"]} - plain - secret == from_chart | scaled
    documented = plain | secret | from_chart | scaled
    assert documented == SETTINGS, sorted(documented ^ SETTINGS)
    assert not plain & SECRET_SETTINGS, "secrets belong in secretSettings, read from a Secret"


def test_readme_settings_table_lists_every_setting() -> None:
    settings_section = (REPO / "README.md").read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    missing = SETTINGS - set(re.findall(r"`(APP_[A-Z0-9_]+)`", settings_section))
    assert not missing, f"README's settings table lacks {sorted(missing)}"


def test_env_example_explains_each_setting_on_the_line_above() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"# APP_", line):
            above = lines[number - 1]
            assert above.startswith("# "), f"no meaning above {line}"
            assert not re.match(r"# (APP_|---)", above), f"no meaning above {line}"


def test_documented_defaults_are_the_services_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Settings reads .env from the working directory, as `python -m app` does.
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("APP_")]:
        monkeypatch.delenv(name)
    defaults = Settings().model_dump()

    # An empty value in .env.example stands for "unset", which is every such setting's default.
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{name}={value}\n" for name, value in env_example().items() if value))
    assert Settings().model_dump() == defaults
    dotenv.unlink()

    # The chart renders values.yaml's settings as env strings; the service must read back its defaults.
    from_values = {env_name(key) for key in chart_values()["settings"]}
    for variable in container(render({}))["env"]:
        if variable["name"] in from_values:
            monkeypatch.setenv(variable["name"], variable["value"])
    assert Settings().model_dump() == defaults


# --- Helm chart ----------------------------------------------------------------------------------

RELEASE = "ocr"
FULLNAME = f"{RELEASE}-dsocr"
# Where the workflow pushes, for an owner (the chart requires image.repository; render() adds it).
REPOSITORY = "ghcr.io/example/dsocr-server"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The tenants file from a Secret of the user's, under a key other than the chart's default.
TENANTS: dict[str, Any] = {"tenants": {"existingSecret": "dsocr-tenants", "secretKey": "teams.yaml"}}
CHART_VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "api-keys": {"auth": {"apiKeys": ["sk_a", "sk_b"]}},
    "existing-secret": {"auth": {"existingSecret": "dsocr-keys", "secretKey": "keys"}},
    "tenants": TENANTS,
    "tenants-and-api-keys": {"auth": {"apiKeys": ["sk_a"]}, "tenants": {"existingSecret": "dsocr-tenants"}},
    "gpu": {"gpu": 1, "runtimeClassName": "nvidia", "tolerations": [GPU_TOLERATION]},
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "200m"},
            "tls": [{"secretName": "dsocr-tls", "hosts": ["dsocr.example.com"]}],
        }
    },
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "existing-claim": {"persistence": {"existingClaim": "dsocr-data"}},
    "no-persistence": {"persistence": {"enabled": False}},
}
# Scale-out: API replicas and workers sharing Redis and an S3 bucket (the secret key from a Secret).
SCALE_OUT: dict[str, Any] = {
    "scaleOut": {"enabled": True},
    "settings": {
        "s3Bucket": "ocr",
        "s3EndpointUrl": "http://minio.storage:9000",
        "s3AddressingStyle": "path",
        "s3AccessKeyId": "dsocr",
        "backend": "vllm",
        "vllmUrl": "http://vllm.inference:8000",
    },
    "secretSettings": {"s3SecretAccessKey": {"name": "dsocr-s3", "key": "secret-key"}},
}
SCALE_OUT_VARIANTS: dict[str, dict[str, Any]] = {
    "scale-out": {
        **SCALE_OUT,
        "redis": {"url": "redis://redis-master:6379/0"},
        "auth": {"apiKeys": ["sk_a"]},
        "api": {"replicas": 3, "image": {"tag": "cpu"}},
        "worker": {"replicas": 2},
        "image": {"tag": "gpu"},
        "gpu": 1,
        "runtimeClassName": "nvidia",
        "tolerations": [GPU_TOLERATION],
        **CHART_VARIANTS["ingress"],
        **CHART_VARIANTS["service-monitor"],
    },
    "scale-out-keda": {
        **SCALE_OUT,
        "redis": {"existingSecret": "dsocr-redis-url", "secretKey": "url"},
        "worker": {
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 8,
                "keda": {
                    "enabled": True,
                    "redisAddress": "redis-master:6379",
                    "authenticationRef": "redis-auth",
                },
            }
        },
    },
    "scale-out-keda-url": {
        **SCALE_OUT,
        "redis": {"url": "rediss://redis.example.com:6380/2"},
        "worker": {"autoscaling": {"keda": {"enabled": True, "lagCount": 10}}},
        # The workers' own Hugging Face cache on a claim they share, a link key of one's own, tenants.
        "modelCache": {"enabled": True, "existingClaim": "hf-cache"},
        **TENANTS,
        "secretSettings": {
            **SCALE_OUT["secretSettings"],
            "linkSecret": {"name": "dsocr-links", "key": "key"},
        },
    },
    "scale-out-hpa": {
        **SCALE_OUT,
        "redis": {"url": "redis://redis-master:6379/0"},
        "worker": {
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 6,
                "hpa": {"enabled": True, "metricSelector": {"service": FULLNAME}},
            }
        },
        **CHART_VARIANTS["service-monitor"],
    },
}
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas there are.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def with_repository(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with an image.repository, which the chart refuses to install without."""
    return {**values, "image": {"repository": REPOSITORY, **values.get("image", {})}}


def manifest_documents(manifests: dict[str, str]) -> list[dict[str, Any]]:
    return [
        d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]


def render_documents(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's manifests for ``values`` (with REPOSITORY unless they name one), as `helm template`."""
    with helm_python.Chart.load(CHART) as chart:
        return manifest_documents(
            chart.render(values=with_repository(values), name=RELEASE, namespace="dsocr")
        )


def render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The chart's manifests for ``values``, by kind (one of each without scale-out)."""
    documents = render_documents(values)
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents), "two manifests of one kind"
    return by_kind


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def lint_findings(values: dict[str, Any]) -> list[Any]:
    report = helm_python.lint(CHART, with_repository(values), strict=True)
    return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error


@pytest.mark.parametrize("variant", CHART_VARIANTS)
def test_chart_renders_valid_manifests(variant: str) -> None:
    values = CHART_VARIANTS[variant]
    assert lint_findings(values) == []
    manifests = render(values)
    validate_manifests(manifests.values())

    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    main = container(manifests)
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["resources"]["limits"].get("nvidia.com/gpu") == values.get("gpu")
    assert main["image"] == expected_image(values, api=False)
    assert main["imagePullPolicy"] == expected_pull_policy(values, main["image"])
    check_data_volume(values, manifests, pod)
    check_api_keys(values, manifests, main)
    check_tenants(values, pod)

    service = manifests["Service"]
    assert (
        service["spec"]["selector"].items()
        <= manifests["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {p["name"] for p in main["ports"]} >= {p["targetPort"] for p in service["spec"]["ports"]}
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    if "Ingress" in manifests:
        for rule in manifests["Ingress"]["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {
                    "name": service["metadata"]["name"],
                    "port": {"name": "http"},
                }
    assert ("ServiceMonitor" in manifests) == bool(values.get("serviceMonitor", {}).get("enabled"))
    if "ServiceMonitor" in manifests:
        monitor = manifests["ServiceMonitor"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def validate_manifests(manifests: Iterable[dict[str, Any]]) -> None:
    for manifest in manifests:
        # CRDs have no schema here: their fields are checked against what they point at, below.
        if manifest["kind"] not in {"ServiceMonitor", "ScaledObject"}:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)


def check_data_volume(values: dict[str, Any], manifests: dict[str, Any], pod: dict[str, Any]) -> None:
    (mount,) = [m for m in container(manifests)["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    persistence = values.get("persistence", {})
    if persistence.get("enabled") is False:
        assert volume["emptyDir"] == {}
        assert "PersistentVolumeClaim" not in manifests
    elif persistence.get("existingClaim"):
        assert volume["persistentVolumeClaim"]["claimName"] == persistence["existingClaim"]
        assert "PersistentVolumeClaim" not in manifests
    else:
        assert (
            volume["persistentVolumeClaim"]["claimName"]
            == manifests["PersistentVolumeClaim"]["metadata"]["name"]
        )


def check_api_keys(values: dict[str, Any], manifests: dict[str, Any], main: dict[str, Any]) -> None:
    auth = values.get("auth", {})
    keys = [v["valueFrom"]["secretKeyRef"] for v in main["env"] if v["name"] == "APP_API_KEYS"]
    if auth.get("existingSecret"):
        assert keys == [{"name": auth["existingSecret"], "key": auth["secretKey"]}]
        assert "Secret" not in manifests
    elif auth.get("apiKeys"):
        secret = manifests["Secret"]
        assert keys == [{"name": secret["metadata"]["name"], "key": "api-keys"}]
        assert secret["stringData"]["api-keys"] == ",".join(auth["apiKeys"])
    else:
        assert keys == []


def check_tenants(values: dict[str, Any], pod: dict[str, Any]) -> None:
    """With tenants.existingSecret the pod reads APP_TENANTS_FILE from that Secret's key, mounted
    read-only as a directory; without it, neither the variable nor the volume.

    A subPath mount would pin the file the container started with: the kubelet updates a Secret
    volume by swapping its ``..data`` link, which a subPath bind mount never follows (Kubernetes'
    Secret docs: "A container using a Secret as a subPath volume mount does not receive automated
    Secret updates"), and the reload would never see a change.
    """
    (main,) = pod["containers"]
    files = [v["value"] for v in main["env"] if v["name"] == "APP_TENANTS_FILE"]
    tenants = values.get("tenants", {})
    secret = tenants.get("existingSecret")
    from_secret = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    if not secret:
        assert files == []
        assert "tenants" not in {v["name"] for v in pod["volumes"]}
        return
    (path,) = files
    (volume,) = from_secret
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    assert mount["readOnly"] is True
    (item,) = volume["secret"]["items"]  # that key alone, not whatever else the Secret holds
    assert item["key"] == tenants.get("secretKey", chart_values()["tenants"]["secretKey"])
    assert PurePosixPath(path) == PurePosixPath(mount["mountPath"]) / item["path"]
    # No other volume lies over it, and it lies over none: /data and /models stay whole.
    others = [PurePosixPath(m["mountPath"]) for m in main["volumeMounts"] if m is not mount]
    directory = PurePosixPath(mount["mountPath"])
    assert not any(o == directory or o in directory.parents or directory in o.parents for o in others)
    # The service reads it: the kubelet gives a Secret volume's files the pod's fsGroup as their
    # group, and the container's processes that group as a supplementary one; the owner is root.
    mode = volume["secret"]["defaultMode"]
    readable_by_group = mode & 0o040 and pod["securityContext"].get("fsGroup") is not None
    assert readable_by_group or mode & 0o004
    assert not mode & 0o222  # nobody writes it


def deployments(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}


def pod_environment(pod: dict[str, Any]) -> dict[str, str]:
    """The pod's APP_* variables, a stand-in for each one read from a Secret."""
    (main,) = pod["containers"]
    return {v["name"]: v.get("value", "from-a-secret") for v in main["env"]}


@pytest.mark.parametrize("variant", [*SCALE_OUT_VARIANTS, "readme"])
def test_scale_out_renders_api_and_worker_deployments(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = readme_scale_out_values() if variant == "readme" else SCALE_OUT_VARIANTS[variant]
    assert lint_findings(values) == []
    documents = render_documents(values)
    validate_manifests(documents)
    named = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert len(named) == len(documents)
    # The state is in Redis and S3: the only claim is the one for the weights, if asked for.
    claims = {name for kind, name in named if kind == "PersistentVolumeClaim"}
    assert claims <= {f"{FULLNAME}-model-cache"}

    assert set(deployments(documents)) == {f"{FULLNAME}-api", f"{FULLNAME}-worker"}
    api, worker = named["Deployment", f"{FULLNAME}-api"], named["Deployment", f"{FULLNAME}-worker"]
    api_pod, worker_pod = api["spec"]["template"], worker["spec"]["template"]
    for deployment, role in ((api, "api"), (worker, "worker")):
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (main,) = pod["spec"]["containers"]
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        assert volumes.pop("data") == {"name": "data", "emptyDir": {}}
        check_model_cache(values, named, pod, holds_model=role == "worker")
        check_tenants(values, pod["spec"])  # the workers too: weights and webhook secrets are theirs
        assert not volumes.keys() - {"model-cache", "tenants"}
        check_link_secret(values, named, main)
        settings = settings_from_environment(pod_environment(pod["spec"]), monkeypatch, tmp_path)
        assert settings.role == role
        assert (settings.queue_backend, settings.storage_backend) == ("redis", "s3")
        assert settings.s3_bucket == values["settings"]["s3Bucket"]
        redis_url = next(v for v in main["env"] if v["name"] == "APP_REDIS_URL")
        if values["redis"].get("existingSecret"):
            assert redis_url["valueFrom"]["secretKeyRef"] == {
                "name": values["redis"]["existingSecret"],
                "key": values["redis"].get("secretKey", chart_values()["redis"]["secretKey"]),
            }
        else:
            assert redis_url["value"] == values["redis"]["url"]
    # Each Deployment selects its own pods only.
    assert not api["spec"]["selector"]["matchLabels"].items() <= worker_pod["metadata"]["labels"].items()
    assert not worker["spec"]["selector"]["matchLabels"].items() <= api_pod["metadata"]["labels"].items()

    autoscaling = values.get("worker", {}).get("autoscaling", {})
    autoscaled = autoscaling.get("keda", {}).get("enabled") or autoscaling.get("hpa", {}).get("enabled")
    assert api["spec"]["replicas"] == values.get("api", {}).get("replicas", 2)
    if autoscaled:
        assert "replicas" not in worker["spec"]  # the autoscaler owns it; an upgrade must not reset it
    else:
        assert worker["spec"]["replicas"] == values.get("worker", {}).get("replicas", 1)

    # The GPU, its runtime class and tolerations go to the workers only.
    (api_main,), (worker_main,) = api_pod["spec"]["containers"], worker_pod["spec"]["containers"]
    assert "nvidia.com/gpu" not in api_main["resources"].get("limits", {})
    assert worker_main["resources"]["limits"].get("nvidia.com/gpu") == values.get("gpu")
    assert "runtimeClassName" not in api_pod["spec"]
    assert worker_pod["spec"].get("runtimeClassName") == values.get("runtimeClassName")
    assert "tolerations" not in api_pod["spec"]
    assert worker_pod["spec"].get("tolerations") == values.get("tolerations")
    assert worker_main["image"] == expected_image(values, api=False)
    assert api_main["image"] == expected_image(values, api=True)
    for main in (api_main, worker_main):
        assert main["imagePullPolicy"] == expected_pull_policy(values, main["image"])

    check_scale_out_services(values, named, api_pod, worker_pod)
    check_autoscaler(values, named, worker)


def check_scale_out_services(
    values: dict[str, Any],
    named: dict[tuple[str, str], dict[str, Any]],
    api_pod: dict[str, Any],
    worker_pod: dict[str, Any],
) -> None:
    """Clients reach the API replicas only; the ServiceMonitor scrapes the API replicas and the workers."""
    service, workers = named["Service", FULLNAME], named["Service", f"{FULLNAME}-worker"]
    assert service["spec"]["selector"].items() <= api_pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= worker_pod["metadata"]["labels"].items()
    assert workers["spec"]["selector"].items() <= worker_pod["metadata"]["labels"].items()
    assert not workers["spec"]["selector"].items() <= api_pod["metadata"]["labels"].items()
    assert workers["spec"]["clusterIP"] == "None"  # it lists the workers for scraping, takes no traffic
    for target, pod in ((service, api_pod), (workers, worker_pod)):
        (main,) = pod["spec"]["containers"]
        assert {p["targetPort"] for p in target["spec"]["ports"]} <= {p["name"] for p in main["ports"]}
    if values.get("ingress", {}).get("enabled"):
        (ingress,) = [d for (kind, _), d in named.items() if kind == "Ingress"]
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    monitors = [d for (kind, _), d in named.items() if kind == "ServiceMonitor"]
    assert len(monitors) == int(bool(values.get("serviceMonitor", {}).get("enabled")))
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        for target in (service, workers):
            assert monitor["spec"]["selector"]["matchLabels"].items() <= target["metadata"]["labels"].items()
            assert endpoint["port"] in {p["name"] for p in target["spec"]["ports"]}


def check_autoscaler(
    values: dict[str, Any], named: dict[tuple[str, str], dict[str, Any]], worker: dict[str, Any]
) -> None:
    """A KEDA ScaledObject or an HPA, when asked for, sizes the worker Deployment and nothing else."""
    autoscaling = values.get("worker", {}).get("autoscaling", {})
    keda, hpa = autoscaling.get("keda", {}), autoscaling.get("hpa", {})
    scaled_objects = [d for (kind, _), d in named.items() if kind == "ScaledObject"]
    autoscalers = [d for (kind, _), d in named.items() if kind == "HorizontalPodAutoscaler"]
    assert len(scaled_objects) == int(bool(keda.get("enabled")))
    assert len(autoscalers) == int(bool(hpa.get("enabled")))
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker["metadata"]["name"]}
    for scaled_object in scaled_objects:
        assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"] == target
        assert spec["minReplicaCount"] == autoscaling.get("minReplicas", 1)
        assert spec["maxReplicaCount"] == autoscaling.get("maxReplicas", 4)
        lag, pending = spec["triggers"]
        for trigger in (lag, pending):
            assert trigger["type"] == "redis"  # KEDA's list scaler: LLEN of the queue's counts
            metadata = trigger["metadata"]
            assert all(isinstance(value, str) for value in metadata.values())  # KEDA takes strings
            if keda.get("redisAddress"):
                assert metadata["address"] == keda["redisAddress"]
            else:
                url = urlsplit(values["redis"]["url"])
                assert metadata["address"] == f"{url.hostname}:{url.port or 6379}"
                assert metadata["databaseIndex"] == (url.path.strip("/") or "0")
                assert metadata["enableTLS"] == str(url.scheme == "rediss").lower()
            if keda.get("authenticationRef"):
                assert trigger["authenticationRef"] == {"name": keda["authenticationRef"]}
        assert lag["metadata"]["listName"] == WAITING_COUNT
        assert pending["metadata"]["listName"] == HELD_COUNT
        assert lag["metadata"]["listLength"] == str(keda.get("lagCount", 4))
        max_workers = values["settings"].get("maxWorkers", chart_values()["settings"]["maxWorkers"])
        assert pending["metadata"]["listLength"] == str(max_workers)  # the tasks a worker runs
    for autoscaler in autoscalers:
        spec = autoscaler["spec"]
        assert spec["scaleTargetRef"] == target
        assert (spec["minReplicas"], spec["maxReplicas"]) == (
            autoscaling["minReplicas"],
            autoscaling["maxReplicas"],
        )
        (metric,) = spec["metrics"]
        assert metric["external"]["metric"]["name"] == "dsocr_queue_depth"
        assert metric["external"]["metric"]["selector"]["matchLabels"] == hpa["metricSelector"]
        assert metric["external"]["target"]["type"] == "AverageValue"


def check_link_secret(
    values: dict[str, Any], named: dict[tuple[str, str], dict[str, Any]], main: dict[str, Any]
) -> None:
    """Every scale-out pod signs share links with one key: the Secret the values name, else the chart's."""
    (reference,) = [v["valueFrom"]["secretKeyRef"] for v in main["env"] if v["name"] == "APP_LINK_SECRET"]
    own = values.get("secretSettings", {}).get("linkSecret", {})
    if own.get("name"):
        assert reference == own
        assert ("Secret", f"{FULLNAME}-link") not in named
    else:
        assert reference == {"name": f"{FULLNAME}-link", "key": "link-secret"}
        assert base64.b64decode(named["Secret", reference["name"]]["data"][reference["key"]])


def check_model_cache(
    values: dict[str, Any],
    named: dict[tuple[str, str], dict[str, Any]],
    pod: dict[str, Any],
    *,
    holds_model: bool,
) -> None:
    """With modelCache.enabled, a pod that holds the model keeps HF_HOME on the cache's claim.

    Without it (or in an API replica) HF_HOME stays the image's, /data/huggingface.
    """
    (main,) = pod["spec"]["containers"]
    hf_home = [v["value"] for v in main["env"] if v["name"] == "HF_HOME"]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    cache = values.get("modelCache", {})
    if not (cache.get("enabled") and holds_model):
        assert hf_home == []
        assert "model-cache" not in volumes
        return
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "model-cache"]
    assert hf_home == [mount["mountPath"]]
    assert not mount["mountPath"].startswith("/data")  # not inside the data volume, which it would shadow
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    claims = {name for kind, name in named if kind == "PersistentVolumeClaim"}
    if cache.get("existingClaim"):
        assert claim == cache["existingClaim"]
        assert claim not in claims
    else:
        defaults = chart_values()["modelCache"]
        spec = named["PersistentVolumeClaim", claim]["spec"]
        assert spec["accessModes"] == cache.get("accessModes", defaults["accessModes"])
        assert spec["resources"]["requests"]["storage"] == cache.get("size", defaults["size"])


SCALE_OUT_WITH_REDIS = {**SCALE_OUT, "redis": {"url": "redis://redis:6379/0"}}
REFUSED_SCALE_OUTS: dict[str, tuple[dict[str, Any], str]] = {
    "no-redis": ({**SCALE_OUT}, "needs Redis"),
    "no-bucket": ({**SCALE_OUT_WITH_REDIS, "settings": {"s3Bucket": ""}}, "settings.s3Bucket"),
    "keda-and-hpa": (
        {
            **SCALE_OUT_WITH_REDIS,
            "worker": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}},
        },
        "not both",
    ),
    "hpa-to-zero": (
        {**SCALE_OUT_WITH_REDIS, "worker": {"autoscaling": {"minReplicas": 0, "hpa": {"enabled": True}}}},
        "minReplicas of 1",
    ),
    "keda-cannot-read-the-secret": (
        {
            **SCALE_OUT,
            "redis": {"existingSecret": "dsocr-redis"},
            "worker": {"autoscaling": {"keda": {"enabled": True}}},
        },
        "redisAddress",
    ),
    "keda-without-the-password": (
        {
            **SCALE_OUT,
            "redis": {"url": "redis://:hunter2@redis:6379/0"},
            "worker": {"autoscaling": {"keda": {"enabled": True}}},
        },
        "authenticationRef",
    ),
}


@pytest.mark.parametrize("case", REFUSED_SCALE_OUTS)
def test_scale_out_refuses_values_that_cannot_work(case: str) -> None:
    values, message = REFUSED_SCALE_OUTS[case]
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmRenderError, match=message):
        chart.render(values=with_repository(values), name=RELEASE)


# --- images the workflow pushes ------------------------------------------------------------------


def workflow_images() -> tuple[str, dict[str, str]]:
    """Where the workflow pushes its images, and each Dockerfile's moving tag (its matrix).

    Each build is also pushed as <tag>-<short sha> (docker/metadata-action's type=sha with that
    prefix): the chart's tags must be among these, so a change to the workflow fails here.
    """
    image_job = load_yaml(WORKFLOW)["jobs"]["image"]
    (meta,) = [step for step in image_job["steps"] if step.get("id") == "meta"]
    assert set(meta["with"]["tags"].splitlines()) == {
        "type=raw,value=${{ matrix.tag }}",
        "type=sha,prefix=${{ matrix.tag }}-",
    }
    return meta["with"]["images"], {
        e["dockerfile"]: e["tag"] for e in image_job["strategy"]["matrix"]["include"]
    }


def expected_image(values: dict[str, Any], *, api: bool) -> str:
    """The image README "Helm (Kubernetes)" promises a pod: the tag the values set, else the
    workflow's image that can run the pod's engine (the API replicas run none)."""
    _, tags = workflow_images()
    image, settings = values.get("image", {}), values.get("settings", {})
    own = values.get("api", {}).get("image", {}) if api else {}
    repository = own.get("repository") or image.get("repository") or REPOSITORY
    tag = own.get("tag") or image.get("tag")
    if not tag:
        if api or settings.get("vllmUrl"):  # no model in the pod: the CPU image is enough
            dockerfile = "Dockerfile.cpu"
        elif settings.get("backend") == "vllm":
            dockerfile = "Dockerfile.vllm"
        else:
            dockerfile = "Dockerfile.gpu" if values.get("gpu") else "Dockerfile.cpu"
        tag = tags[dockerfile]
    return f"{repository}:{tag}"


def expected_pull_policy(values: dict[str, Any], image: str) -> str:
    """The policy values set, else Always for the workflow's moving tags, IfNotPresent for the rest."""
    _, tags = workflow_images()
    moving = image.rsplit(":", 1)[1] in tags.values()
    return values.get("image", {}).get("pullPolicy") or ("Always" if moving else "IfNotPresent")


# Values, and the Dockerfile whose image runs them.
IMAGE_FLAVOURS: dict[str, tuple[dict[str, Any], str]] = {
    "cpu": ({}, "Dockerfile.cpu"),
    "gpu": ({"gpu": 1}, "Dockerfile.gpu"),
    "vllm-in-process": ({"gpu": 1, "settings": {"backend": "vllm"}}, "Dockerfile.vllm"),
    "vllm-client": ({"settings": {"backend": "vllm", "vllmUrl": "http://vllm:8000"}}, "Dockerfile.cpu"),
}


@pytest.mark.parametrize("flavour", IMAGE_FLAVOURS)
def test_default_image_is_one_the_workflow_pushes(flavour: str) -> None:
    values, dockerfile = IMAGE_FLAVOURS[flavour]
    _, tags = workflow_images()
    main = container(render(values))
    assert main["image"] == f"{REPOSITORY}:{tags[dockerfile]}" == expected_image(values, api=False)
    # The tag moves with every push to main: IfNotPresent would keep whichever build a node has.
    assert main["imagePullPolicy"] == "Always"


def test_pinned_or_local_images_are_pulled_if_not_present() -> None:
    _, tags = workflow_images()
    pinned = f"{tags['Dockerfile.gpu']}-3f2a9c1"  # type=sha,prefix=<tag>-: one build, never moved
    main = container(render({"gpu": 1, "image": {"tag": pinned}}))
    assert (main["image"], main["imagePullPolicy"]) == (f"{REPOSITORY}:{pinned}", "IfNotPresent")
    # README's local cluster: an image `kind load` put on the node, in no registry.
    local = container(render({"image": {"repository": "dsocr-server", "tag": "cpu"}}))
    assert (local["image"], local["imagePullPolicy"]) == ("dsocr-server:cpu", "IfNotPresent")
    assert container(render({"image": {"pullPolicy": "IfNotPresent"}}))["imagePullPolicy"] == "IfNotPresent"


def test_chart_refuses_to_install_without_a_repository_and_readme_sets_the_workflows() -> None:
    images, tags = workflow_images()
    repository = images.replace("${{ github.repository_owner }}", "<owner>")
    with (
        helm_python.Chart.load(CHART) as chart,
        pytest.raises(helm_python.HelmRenderError, match=re.escape(repository)),
    ):
        chart.render(values={}, name=RELEASE)
    # README's install command, as a user pastes it (their owner for <owner>), pulls the CPU image.
    (command,) = re.findall(
        r"^helm install dsocr deploy/helm/dsocr \\\n(.*)$", readme_section("Helm (Kubernetes)"), re.M
    )
    values: dict[str, Any] = {}
    for expression in re.findall(r"--set (\S+)", command):
        values = merge(values, helm_python.parse_set_string(expression.replace("<owner>", "example")))
    assert container(render(values))["image"] == f"{REPOSITORY}:{tags['Dockerfile.cpu']}"


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` key by key, as Helm merges several --set flags."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


def test_chart_leaves_the_vllm_token_cap_to_the_server() -> None:
    client = {"backend": "vllm", "vllmUrl": "http://vllm:8000"}
    environment = {v["name"]: v.get("value") for v in container(render({"settings": client}))["env"]}
    # A fixed 8192 plus the prompt exceeds DeepSeek-OCR's 8192-token context, and vLLM refuses the
    # request: unset, the service derives the cap from the server's max_model_len.
    assert "APP_VLLM_MAX_TOKENS" not in environment
    capped = container(render({"settings": {**client, "vllmMaxTokens": 4096}}))["env"]
    assert {"name": "APP_VLLM_MAX_TOKENS", "value": "4096"} in capped


# --- model cache, link key, Redis recipe ---------------------------------------------------------


@pytest.mark.parametrize(
    "cache",
    [
        {"enabled": True, "size": "40Gi", "accessModes": ["ReadWriteOnce"]},
        {"enabled": True, "existingClaim": "hf"},
    ],
    ids=["new-claim", "existing-claim"],
)
def test_model_cache_keeps_the_weights_on_a_claim(cache: dict[str, Any]) -> None:
    values = {"gpu": 1, "modelCache": cache}
    assert lint_findings(values) == []
    documents = render_documents(values)
    validate_manifests(documents)
    named = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    pod = named["Deployment", FULLNAME]["spec"]["template"]
    check_model_cache(values, named, pod, holds_model=True)
    # The records and results stay on the data claim.
    (data,) = [v for v in pod["spec"]["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == FULLNAME


# --- tenants --------------------------------------------------------------------------------------


def notes(values: dict[str, Any]) -> str:
    """What `helm install` prints after installing ``values`` (templates/NOTES.txt)."""
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values=with_repository(values), name=RELEASE, namespace="dsocr")
    return rendered["dsocr/templates/NOTES.txt"]


@pytest.mark.parametrize(
    "variant", ["defaults", "api-keys", "existing-secret", "tenants", "tenants-and-api-keys"]
)
def test_notes_warn_of_an_open_api_only_without_keys_or_tenants(variant: str) -> None:
    text = notes(CHART_VARIANTS[variant])
    open_api = variant == "defaults"
    assert ("WARNING: no API keys are set" in text) == open_api
    assert ('-H "Authorization: Bearer <key>"' in text) != open_api
    if "tenants" in variant:
        assert f"secret/{CHART_VARIANTS[variant]['tenants']['existingSecret']}" in text


def test_tenants_secret_is_readable_without_an_fs_group() -> None:
    # Helm deletes a default that the user's values set to null: the pod then has no fsGroup, the
    # kubelet leaves the files root's, and only a world-readable mode lets uid 10001 read them.
    values = {**TENANTS, "podSecurityContext": {"fsGroup": None}}
    assert lint_findings(values) == []
    manifests = render(values)
    validate_manifests(manifests.values())
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert "fsGroup" not in pod["securityContext"]
    check_tenants(values, pod)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
    assert volume["secret"]["defaultMode"] == 0o444


def kubelet_write_secret_volume(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (path -> content) into a Secret volume's ``directory`` as the kubelet does,
    at the pod's start and at every change of the Secret.

    The kubelet's AtomicWriter (kubernetes pkg/volume/util/atomic_writer.go) writes the files into
    a new hidden directory ``..<timestamp>``, points a symlink ``..data_tmp`` at it and renames that
    over ``..data`` (one atomic step), makes each visible path a symlink ``<path> -> ..data/<path>``
    where there is none yet, then removes the previous timestamped directory.
    """
    data = directory / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    stamp = tempfile.mkdtemp(prefix="..2026_12_08_00_00_00.", dir=directory)
    for path, content in files.items():
        (Path(stamp) / path).write_bytes(content)
    os.symlink(Path(stamp).name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", data)
    for path in files:
        if not (directory / path).is_symlink():
            os.symlink(f"..data/{path}", directory / path)
    if previous is not None:
        shutil.rmtree(directory / previous)


def tenants_file(*teams: tuple[str, str]) -> bytes:
    """A tenants file (README "Tenants") of (name, key) pairs, each key stored as its hash."""
    entries = [{"name": name, "keys": [hash_key(key)]} for name, key in teams]
    return yaml.safe_dump({"tenants": entries}).encode()


def test_tenants_secret_update_reaches_the_service_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(TENANTS)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "tenants"]
    (item,) = volume["secret"]["items"]
    # The pod's settings, with the mount's directory here instead of at its mountPath.
    settings = settings_from_environment(pod_environment(pod), monkeypatch, tmp_path)
    assert settings.tenants_file is not None
    mounted = tmp_path / "mount"
    mounted.mkdir()
    here = mounted / settings.tenants_file.relative_to(mount["mountPath"])

    # The user's Secret: the file under its own key, as `kubectl create secret --from-file` makes it.
    secret = {TENANTS["tenants"]["secretKey"]: tenants_file(("acme", "sk-acme"))}
    kubelet_write_secret_volume(mounted, {item["path"]: secret[item["key"]]})
    tenants = Tenants(
        file=here, api_keys=tuple(settings.api_keys), poll_seconds=settings.tenants_poll_seconds
    )
    assert tenants.enabled  # keys are required: the API is not open
    acme = tenants.by_key("sk-acme")
    assert acme is not None
    assert acme.name == "acme"
    assert tenants.by_key("sk-globex") is None

    # `kubectl apply` of the Secret with another team, and acme's key revoked.
    secret = {TENANTS["tenants"]["secretKey"]: tenants_file(("globex", "sk-globex"))}
    kubelet_write_secret_volume(mounted, {item["path"]: secret[item["key"]]})
    assert tenants.reload_if_changed()
    assert tenants.by_key("sk-acme") is None
    globex = tenants.by_key("sk-globex")
    assert globex is not None
    assert globex.name == "globex"
    assert tenants.error is None


def test_readme_tenants_recipes_mount_the_secret_and_the_overlays() -> None:
    section = readme_section("Tenants")
    (compose,) = [b for b in code_blocks(section, "bash") if "docker compose" in b]
    used = set(re.findall(r"-f (\S+)", compose))
    assert used >= {"deploy/compose/tenants.yml", "deploy/compose/tenants.scale.yml"}
    assert all((REPO / name).is_file() for name in used)
    (helm,) = [b for b in code_blocks(section, "bash") if "helm " in b]
    helm = helm.replace("\\\n", " ")
    created = re.findall(r"^kubectl create secret generic (\S+) --from-file=(\S+)", helm, re.M)
    assert created
    install = re.search(r"^helm upgrade --install \S+ deploy/helm/dsocr (.*)$", helm, re.M)
    assert install is not None
    values: dict[str, Any] = {}
    for expression in re.findall(r"--set (\S+)", install[1]):
        values = merge(values, helm_python.parse_set_string(expression.replace("<owner>", "example")))
    pod = render(values)["Deployment"]["spec"]["template"]["spec"]
    check_tenants(values, pod)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
    (item,) = volume["secret"]["items"]
    # `--from-file=<path>` stores the file under its base name: the key the chart reads.
    for name, source in created:
        assert (name, Path(source).name) == (volume["secret"]["secretName"], item["key"])


TENANTS_COMPOSE = {
    "cpu": (("docker-compose.cpu.yml",), "deploy/compose/tenants.yml", ("dsocr",)),
    "vllm": (("docker-compose.vllm.yml",), "deploy/compose/tenants.yml", ("dsocr",)),
    "scale": ((SCALE_COMPOSE,), "deploy/compose/tenants.scale.yml", ("api", "worker")),
}


@pytest.mark.parametrize("layout", TENANTS_COMPOSE)
def test_compose_tenants_overlay_mounts_the_directory_read_only(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, overlay, names = TENANTS_COMPOSE[layout]
    for name, value in SCALE_COMPOSE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DSOCR_TENANTS_DIR", raising=False)
    plain = compose_config(base)["services"]
    services = compose_config((*base, overlay))["services"]
    assert services.keys() == plain.keys()  # it adds no service, for any of the layouts it names
    for name in names:
        assert "APP_TENANTS_FILE" not in plain[name]["environment"]  # off unless asked for
        environment = dict(services[name]["environment"])
        path = PurePosixPath(environment.pop("APP_TENANTS_FILE"))
        assert environment == plain[name]["environment"]
        (mount,) = [m for m in services[name]["volumes"] if m["type"] == "bind"]
        # The directory, not the file: an editor replaces the file, which a bind-mounted file never shows.
        assert PurePosixPath(mount["target"]) == path.parent
        assert Path(mount["source"]) == REPO / "tenants"  # paths resolve from the first file's directory
        assert mount["read_only"] is True
        assert mount["bind"]["create_host_path"] is False  # a missing directory stops `up`
        # Nothing else changes: the data volume stays where it was.
        assert [m for m in services[name].get("volumes", []) if m is not mount] == plain[name].get(
            "volumes", []
        )
        settings = settings_from_environment(services[name]["environment"], monkeypatch, tmp_path)
        assert settings.tenants_file == Path(path)


class KubernetesSecrets:
    """A Kubernetes API server holding Secrets, serving what Helm's `lookup` asks of a real one.

    Helm's lookup (pkg/engine/lookup_func.go) finds the resource through discovery (GET /api/v1, an
    APIResourceList), then GETs /api/v1/namespaces/<namespace>/secrets/<name>; only a 404 whose
    Status has reason NotFound means "none" (an empty map), any other answer fails the render. Like
    the real server (API conventions, "Response Status Kind"), every path it does not serve answers
    404 with a Status, and a Secret is found in its own namespace only.
    """

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.lookups: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.kubeconfig = yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "test", "cluster": {"server": f"http://127.0.0.1:{self._server.server_port}"}}
                ],
                "users": [{"name": "test", "user": {}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )

    def apply(self, secret: dict[str, Any], namespace: str) -> None:
        """Store ``secret`` as `helm install` would have created it."""
        self.secrets[namespace, secret["metadata"]["name"]] = secret

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/api/v1":
            resource = {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret"}
            return 200, {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [{**resource, "verbs": ["get"]}],
            }
        found = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
        if found:
            self.lookups.append((found[1], found[2]))
            secret = self.secrets.get((found[1], found[2]))
            if secret is not None:
                return 200, secret
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
        }
        return 404, {**status, "message": f"{path} not found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = cluster.answer(urlsplit(self.path).path)
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Keep the test's output for its failures."""

        return Handler


@pytest.fixture
def kubernetes() -> Iterator[KubernetesSecrets]:
    cluster = KubernetesSecrets()
    yield cluster
    cluster.close()


def test_scale_out_link_key_survives_upgrades(kubernetes: KubernetesSecrets) -> None:
    values = with_repository(SCALE_OUT_VARIANTS["scale-out"])
    name, namespace = f"{FULLNAME}-link", "dsocr"

    def link_secret(documents: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
        """The chart's link Secret among ``documents``, and the key it holds."""
        named = {(d["kind"], d["metadata"]["name"]): d for d in documents}
        for deployment in deployments(documents).values():
            (main,) = deployment["spec"]["template"]["spec"]["containers"]
            check_link_secret(values, named, main)  # every pod reads the key from it
        secret = named["Secret", name]
        return secret, base64.b64decode(secret["data"]["link-secret"], validate=True)

    with (
        helm_python.Chart.load(CHART) as chart,
        helm_python.Config(kubeconfig_content=kubernetes.kubeconfig, namespace=namespace) as cluster,
    ):

        def release(*, upgrade: bool) -> list[dict[str, Any]]:
            """What `helm install` (or `helm upgrade`) renders against the cluster: lookup reads it."""
            return manifest_documents(
                cluster.render(
                    chart,
                    values,
                    name=RELEASE,
                    namespace=namespace,
                    is_install=not upgrade,
                    is_upgrade=upgrade,
                )
            )

        secret, key = link_secret(release(upgrade=False))
        assert len(key) >= 32  # far past what a guess could find
        assert (namespace, name) in kubernetes.lookups
        kubernetes.apply(secret, namespace)  # what `helm install` created

        assert link_secret(release(upgrade=True))[1] == key  # links signed before the upgrade still open

        kubernetes.secrets.clear()  # another installation draws its own key, not one every install shares
        assert link_secret(release(upgrade=False))[1] != key
    # `helm template` reads no cluster and still renders one.
    assert link_secret(render_documents(values))[1]


def readme_section(title: str) -> str:
    """The text of README.md's ``## title`` section."""
    return (REPO / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def readme_scale_out_values() -> dict[str, Any]:
    """The values file README's "Helm (Kubernetes)" installs for scale-out, with an owner for <owner>."""
    (block,) = [
        b
        for b in code_blocks(readme_section("Helm (Kubernetes)"), "yaml")
        if b.startswith("# scale-out.yaml")
    ]
    values: dict[str, Any] = yaml.safe_load(block.replace("<owner>", "example"))
    return values


def bitnami_redis_names(release: str) -> tuple[str, str, str]:
    """The Secret, its password key and the Service Bitnami's redis chart (standalone) makes for ``release``.

    bitnami/common's common.names.fullname is the release name when it holds the chart's name, else
    <release>-redis; redis.secretName is that (auth.existingSecret unset), redis.secretPasswordKey
    redis-password, and the standalone master's Service <fullname>-master.
    """
    fullname = release if "redis" in release else f"{release}-redis"
    return fullname, "redis-password", f"{fullname}-master"


def test_readme_redis_recipe_gives_the_chart_the_secret_it_names() -> None:
    section = readme_section("Helm (Kubernetes)")
    (recipe,) = [b for b in code_blocks(section, "bash") if "bitnamicharts/redis" in b]
    recipe = recipe.replace("\\\n", " ")
    installed = re.search(
        r"^helm install (\S+) oci://registry-1\.docker\.io/bitnamicharts/redis ", recipe, re.M
    )
    assert installed is not None
    bitnami_secret, bitnami_key, master = bitnami_redis_names(installed[1])
    # The password comes from where Bitnami's chart keeps it.
    assert f"kubectl get secret {bitnami_secret} -o jsonpath='{{.data.{bitnami_key}}}'" in recipe
    created = re.search(
        r'kubectl create secret generic (\S+) +--from-literal=([\w-]+)="redis://:\$\{REDIS_PASSWORD\}@([\w.-]+):(\d+)/\d+"',
        recipe,
    )
    assert created is not None
    ours, key, host, port = created.groups()
    # Not Bitnami's own Secret: `kubectl create` would find it taken, or Bitnami's chart ours.
    assert ours != bitnami_secret
    assert host == master
    heredoc = re.search(r"<<'EOF'\n(.*?)\nEOF\n", recipe, re.S)
    assert heredoc is not None
    authentication = yaml.safe_load(heredoc[1])
    assert authentication["kind"] == "TriggerAuthentication"
    assert authentication["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": bitnami_secret, "key": bitnami_key}
    ]
    assert "helm install dsocr deploy/helm/dsocr -f scale-out.yaml" in recipe

    documents = render_documents(readme_scale_out_values())
    for deployment in deployments(documents).values():
        (main,) = deployment["spec"]["template"]["spec"]["containers"]
        (url,) = [v for v in main["env"] if v["name"] == "APP_REDIS_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": ours, "key": key}
    (scaled_object,) = [d for d in documents if d["kind"] == "ScaledObject"]
    for trigger in scaled_object["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{host}:{port}"
        assert trigger["authenticationRef"] == {"name": authentication["metadata"]["name"]}


def test_values_match_their_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart_values())
    # Helm checks the schema at install: a misspelt setting is refused, not silently ignored.
    with (
        helm_python.Chart.load(CHART) as chart,
        pytest.raises(helm_python.HelmValuesError, match="maxWorker"),
    ):
        chart.render(values=with_repository({"settings": {"maxWorker": 2}}), name=RELEASE)
    with (
        helm_python.Chart.load(CHART) as chart,
        pytest.raises(helm_python.HelmValuesError, match="/redis/url"),
    ):
        chart.render(values=with_repository({"redis": {"url": "redis-master:6379"}}), name=RELEASE)


def test_templates_use_only_values_that_exist() -> None:
    values = chart_values()
    used_top_level = set()
    for template in sorted((CHART / "templates").iterdir()):
        text = template.read_text()
        paths = re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)
        # `$x := .Values.a` (or `$root.Values`) makes `$x.b` stand for `.Values.a.b`.
        for alias, prefix in re.findall(r"\$(\w+) := \$?\w*\.Values((?:\.[A-Za-z_]\w*)*)", text):
            paths += [prefix + rest for rest in re.findall(rf"\${alias}((?:\.[A-Za-z_]\w*)+)", text)]
        for path in paths:
            keys = path.lstrip(".").split(".")
            used_top_level.add(keys[0])
            node = values
            for key in keys:
                assert isinstance(node, dict), f"{template.name} uses .Values{path}: not in values.yaml"
                assert key in node, f"{template.name} uses .Values{path}: not in values.yaml"
                node = node[key]
    assert set(values) == used_top_level, f"values.yaml keys no template uses: {set(values) - used_top_level}"


def test_chart_app_version_is_the_services() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    project = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert project is not None
    assert chart["appVersion"] == project.group(1)
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}-0"


# --- GitHub Actions ------------------------------------------------------------------------------


def test_workflow_passes_actionlint_schema_and_zizmor() -> None:
    run("actionlint", WORKFLOW)
    run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", WORKFLOW)
    run("zizmor", "--offline", "--persona=pedantic", WORKFLOW)


def test_workflow_tests_then_pushes_every_image() -> None:
    workflow = load_yaml(WORKFLOW)
    assert workflow["permissions"] == {}
    test, image = workflow["jobs"]["test"], workflow["jobs"]["image"]
    assert any(step.get("run") == "bash .ci/run" for step in test["steps"])
    assert image["needs"] == "test"
    assert image["permissions"] == {"contents": "read", "packages": "write"}
    built = {entry["dockerfile"]: entry["tag"] for entry in image["strategy"]["matrix"]["include"]}
    assert built == {"Dockerfile.cpu": "latest", "Dockerfile.gpu": "gpu", "Dockerfile.vllm": "vllm"}
    steps = {step.get("id") or step["uses"].split("@")[0]: step for step in image["steps"] if "uses" in step}
    assert steps["meta"]["with"]["images"] == "ghcr.io/${{ github.repository_owner }}/dsocr-server"
    assert steps["docker/login-action"]["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    build = steps["docker/build-push-action"]["with"]
    assert build["file"] == "${{ matrix.dockerfile }}"
    assert build["cache-from"].startswith("type=gha")


# --- monitoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PROMETHEUS_CONFIG, SCALE_PROMETHEUS_CONFIG], ids=["one", "scale"])
def test_prometheus_config_passes_promtool(config: Path) -> None:
    run("promtool", "check", "config", config)


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that draws something, those inside rows included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def test_dashboard_queries_prometheus_on_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "DSOCR Overview"
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    panels = list(dashboard_panels(dashboard))
    assert len({panel["id"] for panel in panels}) == len(panels) > 0
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for reference in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert reference == {"type": "prometheus", "uid": datasource["uid"]}
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


# How the dashboard must aggregate a metric that several processes report (README "Scaling out"):
# every API replica and worker reports the one shared queue, so summing would count it once per
# process; each worker reports its own loops and tasks, which add up.
SCALE_OUT_AGGREGATIONS = {
    "dsocr_queue_depth": "max",
    "dsocr_queue_oldest_age_seconds": "max",
    "dsocr_workers_alive": "sum",
    "dsocr_tasks_running": "sum",
}


def test_dashboard_counts_each_process_once() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard_panels(dashboard) for target in panel["targets"]]
    for metric, aggregation in SCALE_OUT_AGGREGATIONS.items():
        uses = [(e, m.start()) for e in expressions for m in re.finditer(rf"\b{metric}\b", e)]
        assert uses, f"no panel shows {metric}"
        for expression, start in uses:
            assert re.search(rf"\b{aggregation}(\s+by\s*\([^)]*\))?\s*\(\s*$", expression[:start]), (
                f"{metric} needs {aggregation}(): {expression}"
            )
