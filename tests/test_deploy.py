"""Deployment files, checked without Docker or a cluster: images, compose, Helm chart, workflow, monitoring.

Every validator is a real tool pinned in requirements-dev.txt (promtool is Debian's, from .ci/run).
A missing one fails its test instead of skipping it: CI must not pass by checking nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr

from app.config import Settings
from tests.servers import REPO, free_port

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.vllm")
COMPOSE_COMBINATIONS = {
    "cpu": ("docker-compose.cpu.yml",),
    "cpu+monitoring": ("docker-compose.cpu.yml", "docker-compose.monitoring.yml"),
    "vllm": ("docker-compose.vllm.yml",),
    "vllm+monitoring": ("docker-compose.vllm.yml", "docker-compose.monitoring.yml"),
}
CHART = REPO / "deploy" / "helm" / "dsocr"
WORKFLOW = REPO / ".github" / "workflows" / "docker.yml"
PROMETHEUS_CONFIG = REPO / "monitoring" / "prometheus.yml"
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
        vllm_version = next(
            a for i, a in instructions("Dockerfile.vllm") if i == "ARG" and "VLLM_VERSION=" in a
        )
        assert vllm["image"] == f"vllm/vllm-openai:{vllm_version.split('=', 1)[1]}"
    if "docker-compose.monitoring.yml" in files:
        check_monitoring_wiring(services, port)


def check_monitoring_wiring(services: dict[str, Any], port: int) -> None:
    """Prometheus scrapes the dsocr service; Grafana finds Prometheus, its provisioning and the dashboard."""
    prometheus, grafana = services["prometheus"], services["grafana"]
    mounts = {
        m["target"]: Path(m["source"])
        for s in (prometheus, grafana)
        for m in s["volumes"]
        if m["type"] == "bind"
    }
    assert all(source.exists() for source in mounts.values())
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    scrape = load_yaml(PROMETHEUS_CONFIG)
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"dsocr:{port}"]

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
    from_chart = (
        {v["name"] for v in container(render({"auth": {"apiKeys": ["sk_a"]}}))["env"]} - plain - secret
    )
    assert from_chart == {"APP_HOST", "APP_PORT", "APP_DATA_DIR", "APP_API_KEYS"}
    assert plain | secret | from_chart == SETTINGS, sorted((plain | secret | from_chart) ^ SETTINGS)
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
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
CHART_VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "api-keys": {"auth": {"apiKeys": ["sk_a", "sk_b"]}},
    "existing-secret": {"auth": {"existingSecret": "dsocr-keys", "secretKey": "keys"}},
    "gpu": {"image": {"tag": "gpu"}, "gpu": 1, "runtimeClassName": "nvidia", "tolerations": [GPU_TOLERATION]},
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
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas there are.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The chart's manifests for ``values``, by kind (one of each here)."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=RELEASE, namespace="dsocr")
    documents = [
        d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text)
    ]
    by_kind = {document["kind"]: document for document in documents if document}
    assert len(by_kind) == len([d for d in documents if d]), "two manifests of one kind"
    return by_kind


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def lint_findings(values: dict[str, Any]) -> list[Any]:
    report = helm_python.lint(CHART, values, strict=True)
    return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error


@pytest.mark.parametrize("variant", CHART_VARIANTS)
def test_chart_renders_valid_manifests(variant: str) -> None:
    values = CHART_VARIANTS[variant]
    assert lint_findings(values) == []
    manifests = render(values)
    for manifest in manifests.values():
        if manifest["kind"] != "ServiceMonitor":  # a CRD: no schema here, checked against the Service below
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)

    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    main = container(manifests)
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["resources"]["limits"].get("nvidia.com/gpu") == values.get("gpu")
    check_data_volume(values, manifests, pod)
    check_api_keys(values, manifests, main)

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


def check_data_volume(values: dict[str, Any], manifests: dict[str, Any], pod: dict[str, Any]) -> None:
    (mount,) = container(manifests)["volumeMounts"]
    assert mount["mountPath"] == "/data"
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


def test_values_match_their_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart_values())
    # Helm checks the schema at install: a misspelt setting is refused, not silently ignored.
    with (
        helm_python.Chart.load(CHART) as chart,
        pytest.raises(helm_python.HelmValuesError, match="maxWorker"),
    ):
        chart.render(values={"settings": {"maxWorker": 2}}, name=RELEASE)


def test_templates_use_only_values_that_exist() -> None:
    values = chart_values()
    used_top_level = set()
    for template in sorted((CHART / "templates").iterdir()):
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
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


def test_prometheus_config_passes_promtool() -> None:
    run("promtool", "check", "config", PROMETHEUS_CONFIG)


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
