"""``pipeline exporter`` and the ingest API's ``/metrics``: what a scrape returns.

A scrape returns two things. The recorded metrics: with
``PROMETHEUS_MULTIPROC_DIR`` set, every process's files in that directory (the
workers' pool processes write there); otherwise this process's own registry.
And the broker-side gauges, read fresh on each scrape by :class:`BrokerCollector`
through :func:`pipeline.observe.gauges.read_snapshot` (one round trip). A broker that
does not answer gives ``pipeline_broker_up 0`` instead of a failed scrape, and a
metrics file a killed process left half-made (empty: prometheus_client creates it,
then sizes it) is skipped with a warning instead of failing every scrape after it.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pipeline.core.state import Keys
from pipeline.errors import BrokerUnavailable
from pipeline.observe.gauges import read_snapshot
from pipeline.observe.metrics import multiprocess_dir
from pipeline.producer import counts as ingestcounts

if TYPE_CHECKING:
    from pipeline.worker.runtime import Runtime

__all__ = ["CONTENT_TYPE", "DEFAULT_PORT", "BrokerCollector", "build_registry", "scrape",
           "serve"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808  # the exporter's HTTP port
CONTENT_TYPE = CONTENT_TYPE_LATEST  # Prometheus text exposition format
# pipeline_breaker_state values: forced open counts as open.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class BrokerCollector(Collector):
    """Gauges read from the broker at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("pipeline_broker_up",
                               "1 when the last scrape could read the broker, else 0.")
        try:
            snap = read_snapshot(self._rt)
        except BrokerUnavailable as exc:
            log.warning("scrape could not read the broker: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        def per_tier(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["tier"])

        depth = per_tier("pipeline_queue_depth",
                         "Messages waiting in the tier's queue (all priority sub-queues).")
        oldest = per_tier("pipeline_queue_oldest_age_seconds",
                          "Age of the tier's oldest waiting message; 0 when empty, NaN "
                          "when unknown.")
        retries = per_tier("pipeline_retries_pending",
                           "Retries scheduled for the tier, not yet due or not yet moved.")
        workers = per_tier("pipeline_workers_online",
                           "Workers serving the tier that sent a heartbeat recently.")
        held = per_tier("pipeline_tasks_in_flight",
                        "Messages the tier's workers hold unacknowledged (running and "
                        "prefetched), from heartbeats.")
        slo = per_tier("pipeline_tier_slo_seconds", "The tier's slo_s setting.")
        max_depth = per_tier("pipeline_tier_max_depth",
                             "The tier's max_depth setting (0: unbounded).")
        declared = per_tier("pipeline_queue_declared",
                            "1 when the tier's queue exists on the broker; 0 for a RabbitMQ "
                            "queue no worker has declared yet (its depth reads 0).")
        for t in snap.tiers:
            depth.add_metric([t.tier], t.depth)
            age = 0.0 if t.depth == 0 else t.oldest_age_s
            oldest.add_metric([t.tier], math.nan if age is None else age)
            retries.add_metric([t.tier], t.retries_pending)
            workers.add_metric([t.tier], t.workers_online)
            held.add_metric([t.tier], t.in_flight)
            slo.add_metric([t.tier], t.slo_s)
            max_depth.add_metric([t.tier], t.max_depth)
            declared.add_metric([t.tier], 1 if t.declared else 0)
        yield from (depth, oldest, retries, workers, held, slo, max_depth, declared)
        dlq = GaugeMetricFamily("pipeline_dlq_depth", "Records in the dead-letter queue.")
        dlq.add_metric([], snap.dlq_depth)
        yield dlq
        evicted = CounterMetricFamily("pipeline_dlq_evictions",
                                      "DLQ records evicted by retention (max records or age).")
        evicted.add_metric([], snap.dlq_evictions)
        yield evicted
        yield from self._resilience()
        took = GaugeMetricFamily("pipeline_scrape_duration_seconds",
                                 "Time the last scrape took to read the broker.")
        took.add_metric([], time.perf_counter() - started)
        yield took


    def _resilience(self) -> Iterator[Metric]:
        """Circuit breakers, retry budgets and ingest counters (one pipelined round
        trip)."""
        settings = self._rt.settings
        breakers, tiers = list(settings.breakers), list(settings.tiers)
        try:
            pipe = self._rt.state.pipeline(transaction=False)
            for name in breakers:
                pipe.hmget(Keys.breaker(name), "state", "forced", "opened_total")
            for tier in tiers:
                pipe.get(Keys.retry_budget(tier) + "exhausted")
            pipe.hgetall(Keys.ingest_counts())
            *answers, counts = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("scrape could not read breakers and budgets: %s", exc)
            return
        state = GaugeMetricFamily(
            "pipeline_breaker_state", "Circuit breaker of a downstream: 0 closed, "
            "1 half-open (probing), 2 open (forced open included).", labels=["downstream"])
        opened = CounterMetricFamily("pipeline_breaker_opened",
                                     "Times the downstream's breaker opened.",
                                     labels=["downstream"])
        for name, (st, forced, total) in zip(breakers, answers, strict=False):
            text = (forced or st or b"closed").decode()
            state.add_metric([name], BREAKER_STATE_VALUES.get(text, 0))
            opened.add_metric([name], int(total or 0))
        exhausted = CounterMetricFamily(
            "pipeline_retry_budget_exhausted", "Retries deferred because the tier's retry "
            "budget was spent (each is run later, never dropped).", labels=["tier"])
        for tier, count in zip(tiers, answers[len(breakers):], strict=True):
            exhausted.add_metric([tier], int(count or 0))
        events = CounterMetricFamily(
            "pipeline_events", "Events offered for publishing, by what became of them "
            "(every publisher, counted in the state Redis).",
            labels=["tier", "type", "outcome", "reason"])
        for labels, total in ingestcounts.read(counts):
            events.add_metric(list(labels), total)
        yield from (state, opened, exhausted, events)


MMAP_HEADER_BYTES = 8  # a prometheus_client metrics file starts with its used size (+ pad)


class _ProcessFiles(Collector):
    """Every process's metrics files in ``path``, as prometheus_client's multiprocess
    collector merges them, less any file too short to hold its header: one that a
    process killed between creating and sizing it left empty. prometheus_client would
    raise on it at every scrape, and Prometheus would see the whole target down."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._skipped: set[str] = set()  # warned about once each

    def collect(self) -> Iterator[Metric]:
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            try:
                size = os.path.getsize(name)
            except FileNotFoundError:  # a dead process's file removed since the glob
                continue
            if size >= MMAP_HEADER_BYTES:
                files.append(name)
            elif name not in self._skipped:
                self._skipped.add(name)
                log.warning("metrics file %s is empty (its process was killed while "
                            "creating it); skipped", name)
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        yield from merged


class _ThisProcess(Collector):
    """This process's default registry (ingest counters of a single-process API)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def build_registry(runtime: Runtime | None) -> CollectorRegistry:
    """Recorded metrics (multiprocess files, else this process) plus, given a
    ``runtime``, the broker gauges."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        registry.register(_ProcessFiles(path))
    else:
        registry.register(_ThisProcess())
    if runtime is not None:
        registry.register(BrokerCollector(runtime))
    return registry


def scrape(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (serve it as :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)


def serve(runtime: Runtime, *, host: str, port: int) -> None:
    """Serve ``/metrics`` until SIGTERM or SIGINT."""
    server, thread = start_http_server(port, addr=host, registry=build_registry(runtime))
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("exporter serving http://%s:%d/metrics (multiprocess dir: %s)", host, port,
             multiprocess_dir() or "none")
    while not stop.wait(1.0):
        pass
    server.shutdown()
    thread.join(5.0)
    log.info("exporter stopped")
