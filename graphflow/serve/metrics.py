"""Prometheus text for `GET /metrics`: per-engine counters, per-stream fps and latency, infer batching,
shared-memory slots and restarts — read from the launcher's stats and the service's tap at scrape time."""
from __future__ import annotations

import time
from typing import Any

# key in an engine's stats → (family name, help)
ENGINE_COUNTERS = {
    "received": ("graphflow_engine_in", "messages received"),
    "sent": ("graphflow_engine_out", "messages sent"),
    "dropped": ("graphflow_engine_drops", "messages dropped by a drop policy"),
    "errors": ("graphflow_engine_errors", "errors reported"),
    "busy_s": ("graphflow_engine_busy_seconds", "time spent in the engine's code"),
    "restarts": ("graphflow_engine_restarts", "process restarts"),
}
# key of engine_gauges() → (family name, help)
ENGINE_GAUGES = {
    "depth": ("graphflow_engine_queue_depth", "messages waiting at the engine's inputs"),
    "slots": ("graphflow_shm_slots_in_use", "shared-memory frame slots in use"),
    "batch": ("graphflow_infer_batch_size", "mean batch size"),
    "busy": ("graphflow_infer_busy_share", "share of time the accelerator ran batches"),
}


def render(service: Any) -> tuple[bytes, str]:
    """The service's metrics in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_Collector(service))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """Reads the service at each scrape: engines from the launcher's stats, streams from the service's meters."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Any:
        yield from engine_families(self.service.engine_stats())
        yield health_family(self.service)
        with self.service.lock:
            meters = dict(self.service.meters)
            tasks = dict(self.service.meter_task)
        yield from stream_families(meters, time.monotonic(), tasks)


def engine_families(stats: dict[str, dict[str, dict[str, Any]]]) -> list[Any]:
    """Per-engine counters and gauges of every task (task → engine → stats), the service's own taps left out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from graphflow.serve.tap import TAP

    labels = ["task", "engine"]
    counters = {key: CounterMetricFamily(name, doc, labels=labels) for key, (name, doc) in ENGINE_COUNTERS.items()}
    gauges = {key: GaugeMetricFamily(name, doc, labels=labels) for key, (name, doc) in ENGINE_GAUGES.items()}
    for task, engines in stats.items():
        for eid, s in engines.items():
            if eid == TAP:
                continue
            for key, family in counters.items():
                family.add_metric([task, eid], float(s.get(key) or 0))
            for key, value in engine_gauges(s).items():
                gauges[key].add_metric([task, eid], value)
    return [*counters.values(), *gauges.values()]


def health_family(service: Any) -> Any:
    """graphflow_engine_up{task, engine}: 1 while the engine runs, 0 while its process is dead (restarting or gone)."""
    from prometheus_client.core import GaugeMetricFamily

    from graphflow.serve.tap import TAP

    up = GaugeMetricFamily("graphflow_engine_up", "1: the engine runs; 0: its process died (restarting or gone)",
                           labels=["task", "engine"])
    with service.lock:
        tasks = list(service.tasks.values())
    for task in tasks:
        down = task.down()
        for eid in task.topology.nodes:
            if eid != TAP:
                up.add_metric([task.id, eid], 0.0 if eid in down else 1.0)
    return up


def engine_gauges(s: dict[str, Any]) -> dict[str, float]:
    """The gauges of one engine's stats: its queue depth, and the shared-memory slots in use, mean batch size and
    accelerator busy share when its metrics report them."""
    m = s.get("metrics") or {}
    values = {"depth": float(s.get("depth") or 0)}
    shm = m.get("shm")
    if isinstance(shm, dict) and shm:
        values["slots"] = float(shm.get("slots_busy", 0))
    if isinstance(m.get("mean_batch"), (int, float)):
        values["batch"] = float(m["mean_batch"])
    if isinstance(m.get("busy_fraction"), (int, float)):
        values["busy"] = float(m["busy_fraction"])
    return values


def stream_families(meters: dict[str, Any], now: float, tasks: dict[str, str] | None = None) -> list[Any]:
    """Per-stream fps, frame and event counts and the latency histogram, from the service's stream meters, labelled
    by the task their latest frames came from (`tasks`: stream → task; "" where unknown)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    labels = ["stream", "task"]
    fps = GaugeMetricFamily("graphflow_stream_fps", "frames per second at the end of the graph", labels=labels)
    frames = CounterMetricFamily("graphflow_stream_frames", "frames at the end of the graph", labels=labels)
    events = CounterMetricFamily("graphflow_stream_events", "analytics events", labels=labels)
    latency = HistogramMetricFamily("graphflow_stream_latency_seconds", "capture to end of graph", labels=labels)
    drops = CounterMetricFamily("graphflow_stream_drops", "frames dropped on the way by a drop policy", labels=labels)
    lagging = GaugeMetricFamily("graphflow_stream_lagging", "1 while the graph cannot keep up with the stream "
                                "(dropping its frames, or late)", labels=labels)
    for stream, meter in meters.items():
        key = [stream, (tasks or {}).get(stream, "")]
        fps.add_metric(key, meter.fps(now))
        frames.add_metric(key, meter.frames)
        events.add_metric(key, meter.events)
        latency.add_metric(key, latency_buckets(meter.buckets), meter.latency_sum)
        drops.add_metric(key, meter.drops)
        lagging.add_metric(key, float(meter.lagging))
    return [fps, frames, events, latency, drops, lagging]


def latency_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """A meter's per-bucket latency counts (service.LATENCY_BUCKETS, then the overflow) as cumulative Prometheus
    buckets."""
    from graphflow.serve.streams import LATENCY_BUCKETS

    cumulative, buckets = 0, []
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets
