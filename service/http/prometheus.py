"""Prometheus metrics of one service process, in a registry of its own.

Three kinds of figures:

* **Events**, recorded as they happen: HTTP requests (count and latency by method, route template
  and status), micro-batches of query embeddings (batch size, the time each image waited in the
  queue, the time the batch took).
* **State**, read at scrape time from the live service (:class:`ServiceStateCollector`): queue
  depth per model, items per gallery index, progress of the running jobs, jobs by status, whether
  the service is ready. Reading at scrape time keeps these exact without touching the code paths
  that change them.
* **Machine**: process (CPU, memory, open files), Python GC and platform, and the CUDA allocator's
  memory per GPU when this process uses one (:class:`GpuMemoryCollector`).

The registry belongs to the application (not ``prometheus_client``'s global one), so several apps
in one process, as in the tests, never share or collide on a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from service.state import ServiceState

logger = logging.getLogger(__name__)

#: Route label of requests that matched no route: one series for every unknown path, so a scanner
#: probing random URLs cannot create unbounded label values.
UNMATCHED_ROUTE = "<unmatched>"

#: HTTP methods kept as label values; anything else is counted as ``OTHER`` (bounded cardinality).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: ``(device label, allocated bytes, reserved bytes, peak allocated bytes)`` per GPU.
GpuMemory = tuple[str, int, int, int]


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the micro-batcher's largest batch, which is always a bucket of its own."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


def cuda_memory() -> list[GpuMemory]:
    """The CUDA caching allocator's figures per visible GPU; empty when this process has not used CUDA.

    Never initialises CUDA itself: a CPU-only service (or one whose models are on the CPU) has no
    GPU figures rather than paying for a CUDA context at its first scrape.
    """
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [
        (
            f"cuda:{i}",
            int(torch.cuda.memory_allocated(i)),
            int(torch.cuda.memory_reserved(i)),
            int(torch.cuda.max_memory_allocated(i)),
        )
        for i in range(torch.cuda.device_count())
    ]


class GpuMemoryCollector:
    """GPU memory of this process, read at scrape time.

    Args:
        probe: returns one :data:`GpuMemory` row per GPU (default :func:`cuda_memory`).
    """

    def __init__(self, probe: Callable[[], Sequence[GpuMemory]] = cuda_memory) -> None:
        self._probe = probe

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self._probe()
        except Exception:
            logger.warning("could not read GPU memory for /metrics", exc_info=True)
            return
        if not rows:
            return
        allocated = GaugeMetricFamily(
            "reid_gpu_memory_allocated_bytes",
            "Bytes held by tensors (CUDA caching allocator).",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "reid_gpu_memory_reserved_bytes",
            "Bytes reserved by the CUDA caching allocator (allocated plus cached).",
            labels=["device"],
        )
        peak = GaugeMetricFamily(
            "reid_gpu_memory_peak_allocated_bytes",
            "Most bytes held by tensors at once since the process started.",
            labels=["device"],
        )
        for device, alloc, res, top in rows:
            allocated.add_metric([device], alloc)
            reserved.add_metric([device], res)
            peak.add_metric([device], top)
        yield from (allocated, reserved, peak)


class ServiceStateCollector:
    """Figures read from the live service at scrape time (nothing before the service is bound).

    Args:
        errors: counter of scrape-time failures, by part, so a broken part shows instead of vanishing.
    """

    def __init__(self, errors: Counter) -> None:
        self.state: ServiceState | None = None
        self._errors = errors

    def collect(self) -> Iterator[Metric]:
        state = self.state
        ready = GaugeMetricFamily(
            "reid_service_ready", "1 when /health/ready would answer 200 (bar the database)."
        )
        ready.add_metric([], 1.0 if state is not None and state.ready else 0.0)
        yield ready
        if state is None:
            return
        for part, collect in (
            ("models", _model_families),
            ("indexes", _index_families),
            ("jobs", _job_families),
        ):
            try:
                # Materialised first, so a failure half-way yields none of the part's families.
                families = list(collect(state))
            except Exception:
                logger.warning("could not collect the %s metrics", part, exc_info=True)
                self._errors.labels(part).inc()
                continue
            yield from families


def _model_families(state: ServiceState) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "reid_model_info",
        "Served models (value 1): name, version, kind, device and dtype.",
        labels=["model", "version", "kind", "device", "dtype"],
    )
    depth = GaugeMetricFamily(
        "reid_embed_queue_depth", "Query images waiting for the micro-batcher.", labels=["model", "version"]
    )
    for runtime in state.models:
        dtype = str(runtime.model.dtype).removeprefix("torch.")
        info.add_metric([runtime.name, runtime.version, runtime.kind, str(runtime.model.device), dtype], 1.0)
        depth.add_metric([runtime.name, runtime.version], runtime.batcher.queue_depth)
    yield from (info, depth)


def _index_families(state: ServiceState) -> Iterator[Metric]:
    items = GaugeMetricFamily(
        "reid_index_items",
        "Vectors in a gallery's index; active=false is an index being built by a model upgrade or kept "
        "for switching back.",
        labels=["gallery_id", "model", "version", "active"],
    )
    for gallery in state.indexes.states():
        active_model_id = gallery.active_model_id
        for gi in list(gallery.indexes.values()):  # list(): a copy, the dict may change meanwhile
            runtime = state.models.by_row(gi.model_id)
            name, version = (runtime.name, runtime.version) if runtime else (f"model-{gi.model_id}", "")
            active = "true" if gi.model_id == active_model_id else "false"
            items.add_metric([str(gallery.gallery_id), name, version, active], len(gi))
    yield items


def _job_families(state: ServiceState) -> Iterator[Metric]:
    from sqlalchemy import func, select

    from service.db.tables import Job

    labels = ["job_id", "kind"]
    done = GaugeMetricFamily("reid_job_done_items", "Inputs a running job has processed.", labels=labels)
    failed = GaugeMetricFamily(
        "reid_job_failed_items", "Inputs a running job could not process.", labels=labels
    )
    skipped = GaugeMetricFamily(
        "reid_job_skipped_items", "Inputs a running job skipped (already stored).", labels=labels
    )
    total = GaugeMetricFamily("reid_job_total_items", "Inputs of a running job, once known.", labels=labels)
    progress = GaugeMetricFamily(
        "reid_job_progress_ratio",
        "Fraction of a running job's inputs handled, once its total is known.",
        labels=labels,
    )
    runner = state.jobs
    for ctx in list(runner.active.values()) if runner is not None else []:
        key = [str(ctx.job_id), ctx.kind]
        done.add_metric(key, ctx.done)
        failed.add_metric(key, ctx.failed)
        skipped.add_metric(key, ctx.skipped)
        if ctx.total is not None:
            total.add_metric(key, ctx.total)
            handled = ctx.done + ctx.failed + ctx.skipped
            progress.add_metric(key, min(1.0, handled / ctx.total) if ctx.total else 1.0)
    by_status = GaugeMetricFamily(
        "reid_jobs", "Jobs in the database by kind and status.", labels=["kind", "status"]
    )
    with state.sessions() as session:
        for kind, status, count in session.execute(
            select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
        ):
            by_status.add_metric([kind, status], count)
    yield from (done, failed, skipped, total, progress, by_status)


class ServiceMetrics:
    """The metrics of one application: the registry, the event metrics and the scrape-time collectors.

    Args:
        max_batch_size: the micro-batchers' largest batch (sets the batch-size histogram's buckets).
        gpu_probe: GPU memory reader (default :func:`cuda_memory`; tests pass a fake one).
    """

    def __init__(
        self, *, max_batch_size: int, gpu_probe: Callable[[], Sequence[GpuMemory]] = cuda_memory
    ) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_requests = Counter(
            "reid_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "reid_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method, route template and status.",
            ["method", "route", "status"],
            buckets=HTTP_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "reid_http_requests_in_flight", "HTTP requests being handled now.", registry=self.registry
        )
        self.embed_batch_size = Histogram(
            "reid_embed_batch_size",
            "Query images per micro-batch (forward pass).",
            ["model", "version"],
            buckets=batch_size_buckets(max_batch_size),
            registry=self.registry,
        )
        self.embed_queue_wait = Histogram(
            "reid_embed_queue_wait_seconds",
            "Time a query image waited in the micro-batcher's queue before its batch started.",
            ["model", "version"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.embed_batch_seconds = Histogram(
            "reid_embed_batch_seconds",
            "Time a micro-batch took to embed (forward pass, and its retries when an input failed).",
            ["model", "version"],
            buckets=BATCH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        collect_errors = Counter(
            "reid_metrics_collect_errors",
            "Scrape-time failures to read a part of the service state.",
            ["part"],
            registry=self.registry,
        )
        self.state_collector = ServiceStateCollector(collect_errors)
        self.registry.register(self.state_collector)
        self.registry.register(GpuMemoryCollector(gpu_probe))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        method = method if method in KNOWN_METHODS else "OTHER"
        labels = (method, route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_duration.labels(*labels).observe(seconds)

    def batch_observer(self, model: str, version: str) -> Callable[[Sequence[float], float], None]:
        """The hook a model's micro-batcher calls after each batch with (queue waits, batch seconds)."""
        size = self.embed_batch_size.labels(model, version)
        wait = self.embed_queue_wait.labels(model, version)
        duration = self.embed_batch_seconds.labels(model, version)

        def observe(queue_waits: Sequence[float], batch_seconds: float) -> None:
            size.observe(len(queue_waits))
            for seconds in queue_waits:
                wait.observe(max(0.0, seconds))
            duration.observe(batch_seconds)

        return observe

    def bind(self, state: ServiceState) -> None:
        """Start reading ``state`` at scrape time and observing its models' micro-batches."""
        self.state_collector.state = state
        for runtime in state.models:
            runtime.batcher.on_batch = self.batch_observer(runtime.name, runtime.version)

    def unbind(self) -> None:
        """Stop reading the service state (it is shutting down)."""
        state, self.state_collector.state = self.state_collector.state, None
        if state is not None:
            for runtime in state.models:
                runtime.batcher.on_batch = None

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


def read_samples(text: str, name: str, labels: dict[str, Any] | None = None) -> list[float]:
    """Values of the samples named ``name`` in a Prometheus text exposition whose labels include ``labels``.

    For tests and tools reading ``/metrics``: ``sum(read_samples(...))`` totals a counter over the
    labels left out.

    Args:
        text: the exposition (a ``/metrics`` body).
        name: full sample name (``reid_http_requests_total``, ``..._bucket``, ``..._count``).
        labels: label values the samples must have (other labels may take any value).
    """
    from prometheus_client.parser import text_string_to_metric_families

    want = {k: str(v) for k, v in (labels or {}).items()}
    return [
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items())
    ]
