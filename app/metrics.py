"""Every Prometheus metric of the service, defined once, on a registry owned by the app.

A registry per app (not the global one) lets tests build several apps in one process. HTTP
metrics are labelled by route template, never by raw path: task ids must not leak into labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Pages take from a tenth of a second (tiny pages, vLLM batches) to minutes (dense pages on CPU).
PAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TASK_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Agreement of a page's text with its PDF text layer (0-1): finer near the top, where a good page
# lies (a clean page reads 0.95-1, a few misread words cost a few hundredths).
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


class QualityReading(Protocol):
    """One page's ``app.pipeline.quality.PageQuality`` (described here, not imported: metrics sit
    below every layer that updates them)."""

    @property
    def text_layer_agreement(self) -> float | None: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...


class MemoryReading(Protocol):
    """One GPU's memory as ``app.engines.gpu.GpuMemory`` reports it (described here, not imported:
    metrics sit below every layer that updates them)."""

    @property
    def index(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def free_bytes(self) -> int: ...


class MemorySource(Protocol):
    """What reads GPU memory (``app.engines.gpu.GpuProbe``); ``None``: no GPU."""

    def memory(self) -> MemoryReading | None: ...


class _GpuCollector(Collector):
    """Reads GPU memory at scrape time, so the numbers are never stale."""

    def __init__(self, probe: MemorySource) -> None:
        self._probe = probe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        memory = self._probe.memory()
        if memory is None:
            return
        for name, value in (("used", memory.used_bytes), ("free", memory.free_bytes)):
            family = GaugeMetricFamily(
                f"dsocr_gpu_memory_{name}_bytes", f"GPU memory {name}, from NVML", labels=["gpu"]
            )
            family.add_metric([str(memory.index)], value)
            yield family


class Metrics:
    """The service's metrics; components receive this object and update what they own."""

    def __init__(self, gpu_probe: MemorySource, *, role: str = "all") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The queue and worker metrics carry the process's APP_ROLE: with a shared queue every API
        # replica and worker reports the same depth, and a dashboard picks one role (or takes max).
        self.tasks_submitted = Counter("dsocr_tasks_submitted", "Tasks accepted (202)", registry=r)
        self.tasks_finished = Counter(
            "dsocr_tasks_finished", "Tasks that ended, by final status", ["status"], registry=r
        )
        self.tasks_rejected = Counter(
            "dsocr_tasks_rejected", "Submissions refused, by error code", ["code"], registry=r
        )
        self.task_duration = Histogram(
            "dsocr_task_duration_seconds",
            "Wall time from start to end of a task",
            ["status"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.page_duration = Histogram(
            "dsocr_page_duration_seconds", "Wall time per recognised page", buckets=PAGE_BUCKETS, registry=r
        )
        self.pages_processed = Counter(
            "dsocr_pages_processed", "Pages recognised, by how they ended", ["outcome"], registry=r
        )
        self.page_retries = Counter(
            "dsocr_page_retries",
            "Suspect pages recognised again (each rung of the retry ladder run)",
            registry=r,
        )
        self.page_text_agreement = Histogram(
            "dsocr_page_text_agreement",
            "Agreement (0-1) of each kept page's text with its PDF text layer, where it has one",
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        # reason: one of app.pipeline.quality.REASONS, a bounded set.
        self.suspect_pages = Counter(
            "dsocr_suspect_pages",
            "Kept pages that are suspect, by reason (one page may count under several)",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "dsocr_queue_depth", "Tasks waiting in the queue", ["role"], registry=r
        ).labels(role)
        self.queue_oldest_age = Gauge(
            "dsocr_queue_oldest_age_seconds",
            "How long the longest-waiting task has waited",
            ["role"],
            registry=r,
        ).labels(role)
        self.tasks_running = Gauge("dsocr_tasks_running", "Tasks being processed now", registry=r)
        self.workers_alive = Gauge(
            "dsocr_workers_alive", "Worker loops running", ["role"], registry=r
        ).labels(role)
        self.redeliveries = Counter(
            "dsocr_redeliveries",
            "Tasks delivered again because their worker went silent past the visibility timeout",
            ["role"],
            registry=r,
        ).labels(role)
        self.lease_expiries = Counter(
            "dsocr_lease_expiries",
            "Tasks this worker let go because another worker took them over (it stalled)",
            ["role"],
            registry=r,
        ).labels(role)
        self.model_loaded = Gauge("dsocr_model_loaded", "1 when the model is in memory", registry=r)
        self.model_load_seconds = Histogram(
            "dsocr_model_load_seconds",
            "Time to load the model",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.model_unloads = Counter("dsocr_model_unloads", "Idle unloads of the model", registry=r)
        self.publishes = Counter(
            "dsocr_publishes",
            "Publishes of results, by backend and outcome",
            ["backend", "outcome"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "dsocr_webhook_deliveries", "Webhook deliveries that ended, by outcome", ["outcome"], registry=r
        )
        # Held connections (app.api.stream_caps), of this process: kind is "events" or "wait".
        self.streams_open = Gauge(
            "dsocr_streams_open", "Event streams and long-polls held open now, by kind", ["kind"], registry=r
        )
        self.streams_refused = Counter(
            "dsocr_streams_refused",
            "Event streams and long-polls refused with 429, by the cap they met (per_key or total)",
            ["cap"],
            registry=r,
        )
        self.http_requests = Counter(
            "dsocr_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "dsocr_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Per tenant (app.tasks.usage): the label is a name from the tenants registry, or "other".
        self.tenant_pages = Counter(
            "dsocr_tenant_pages", "Pages recognised for tasks that ended, by tenant", ["tenant"], registry=r
        )
        self.tenant_tokens = Counter(
            "dsocr_tenant_tokens",
            "Engine tokens of tasks that ended, by tenant and kind (prompt or completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_engine_seconds = Counter(
            "dsocr_tenant_engine_seconds",
            "Engine seconds of tasks that ended (each page's share of its calls), by tenant",
            ["tenant"],
            registry=r,
        )
        r.register(_GpuCollector(gpu_probe))

    def observe_quality(self, quality: QualityReading) -> None:
        """Count one page's quality: its agreement, when it has one, and each of its reasons.
        Call it once per page, for the attempt kept, so the numbers count pages, not attempts."""
        if quality.text_layer_agreement is not None:
            self.page_text_agreement.observe(quality.text_layer_agreement)
        for reason in quality.reasons:
            self.suspect_pages.labels(reason).inc()
