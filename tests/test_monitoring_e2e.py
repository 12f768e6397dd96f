"""The dashboard against the real thing: a live service that processed tasks, scraped by a real Prometheus.

Every PromQL expression of the "DSOCR Overview" dashboard runs through Prometheus' HTTP API and must
return a series with a number in it. A panel that queries a metric the service does not export, or a
label it does not set, fails here instead of showing "No data" in Grafana.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.documents import make_pdf
from tests.servers import free_port, wait_for
from tests.standins import StandInGpu
from tests.test_api_e2e import finished, upload
from tests.test_deploy import DASHBOARD, PROMETHEUS_CONFIG, dashboard_panels

pytestmark = pytest.mark.slow

# What Grafana puts in place of its own variables; one minute covers the whole test's samples.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m"}
ROUNDS = 2  # labelled series appear in round 1; round 2 makes them grow, so rates are not all zero


class Prometheus:
    """Debian's Prometheus on loopback: monitoring/prometheus.yml's job, scraping ``target`` every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: `apt-get install prometheus` (.ci/run installs it)")
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")
        (self.job,) = config["scrape_configs"]
        self.job["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-3000:]}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector ``expression`` gives now; a PromQL error fails the test."""
        answer = self.client.get("/api/v1/query", params={"query": expression}).json()
        assert answer["status"] == "success", f"{expression}: {answer}"
        assert answer["data"]["resultType"] == "vector", expression
        return answer["data"]["result"]

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Start a Prometheus that scrapes the given service URL; stopped at teardown."""
    started: list[Prometheus] = []

    def start(service_url: str) -> Prometheus:
        prometheus = Prometheus(service_url.removeprefix("http://"), tmp_path)
        started.append(prometheus)
        wait_for(prometheus.ready, timeout=30)
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel / legend, expression) for every query of the dashboard, Grafana's variables replaced."""
    variables = dict(GRAFANA_VARIABLES)
    for variable in dashboard["templating"]["list"]:
        variables[f"${variable['name']}"] = variable["allValue"]  # what "All" selects
    queries = []
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            expression = target["expr"]
            # Longest first: $__interval must not eat the start of $__interval_ms.
            for name in sorted(variables, key=len, reverse=True):
                expression = expression.replace(name, variables[name])
            assert "$" not in expression, f"unknown variable in {panel['title']!r}: {expression}"
            queries.append((f"{panel['title']} / {target['legendFormat']}", expression))
    return queries


def test_every_dashboard_query_returns_data(make_server, prometheus_for) -> None:
    # A GPU probe stand-in, so the GPU memory gauges exist as they do where NVML is present.
    server = make_server(gpu_probe=StandInGpu())
    prometheus = prometheus_for(server.url)
    job = prometheus.job["job_name"]
    wait_for(partial(prometheus.query, f'up{{job="{job}"}} == 1'), timeout=30)

    for done in range(1, ROUNDS + 1):
        accepted = upload(server.client, make_pdf(2, picture_page=None))
        assert accepted.status_code == 202, accepted.text
        assert finished(server.client, accepted.json()["task_id"])["status"] == "succeeded"
        refused = upload(server.client, make_pdf(1, picture_page=None), dpi="100000")
        assert refused.status_code == 422, refused.text
        # Wait for a scrape that saw this round, so the next round's growth lands in later samples.
        wait_for(partial(prometheus.query, f"dsocr_tasks_finished_total == {done}"), timeout=30)
        wait_for(partial(prometheus.query, f"sum(dsocr_tasks_rejected_total) == {done}"), timeout=30)

    dashboard = json.loads(DASHBOARD.read_text())
    exported = {series["metric"]["__name__"] for series in prometheus.query('{__name__=~"dsocr_.+"}')}
    for variable in dashboard["templating"]["list"]:
        query = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert query is not None, f"variable {variable['name']}: not a label_values() query"
        metric, label = query.groups()
        assert prometheus.query(f"count by ({label}) ({metric})"), (
            f"variable {variable['name']} has no values"
        )

    for panel, expression in dashboard_queries(dashboard):
        missing = set(re.findall(r"\bdsocr_\w+", expression)) - exported
        assert not missing, f"{panel}: the service exports no {sorted(missing)}"
        values = [float(series["value"][1]) for series in prometheus.query(expression)]
        assert values, f"{panel}: no series for {expression}"
        assert any(math.isfinite(value) for value in values), f"{panel}: only NaN for {expression}"
