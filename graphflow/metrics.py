"""Prometheus text for `GET /metrics`: per-engine counters, per-stream fps and latency, infer batching,
shared-memory slots and restarts — read from the launcher's stats and the service's tap at scrape time."""
from __future__ import annotations

import time
from typing import Any


def render(service: Any) -> tuple[bytes, str]:
    """The service's metrics in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from .service import LATENCY_BUCKETS, TAP

    class Collector:
        def collect(self) -> Any:
            stats: dict[str, dict[str, Any]] = dict(service.launcher.stats)
            per_engine = {
                "received": CounterMetricFamily("graphflow_engine_in", "messages received", labels=["engine"]),
                "sent": CounterMetricFamily("graphflow_engine_out", "messages sent", labels=["engine"]),
                "dropped": CounterMetricFamily("graphflow_engine_drops", "messages dropped by a drop policy",
                                               labels=["engine"]),
                "errors": CounterMetricFamily("graphflow_engine_errors", "errors reported", labels=["engine"]),
                "busy_s": CounterMetricFamily("graphflow_engine_busy_seconds", "time spent in the engine's code",
                                              labels=["engine"]),
                "restarts": CounterMetricFamily("graphflow_engine_restarts", "process restarts", labels=["engine"]),
            }
            depth = GaugeMetricFamily("graphflow_engine_queue_depth", "messages waiting at the engine's inputs",
                                      labels=["engine"])
            slots = GaugeMetricFamily("graphflow_shm_slots_in_use", "shared-memory frame slots in use",
                                      labels=["engine"])
            batch = GaugeMetricFamily("graphflow_infer_batch_size", "mean batch size", labels=["engine"])
            busy = GaugeMetricFamily("graphflow_infer_busy_share", "share of time the accelerator ran batches",
                                     labels=["engine"])
            for eid, s in stats.items():
                if eid == TAP:
                    continue
                for key, family in per_engine.items():
                    family.add_metric([eid], float(s.get(key) or 0))
                depth.add_metric([eid], float(s.get("depth") or 0))
                m = s.get("metrics") or {}
                shm = m.get("shm") if isinstance(m.get("shm"), dict) else None
                if shm:
                    slots.add_metric([eid], float(shm.get("slots_busy", 0)))
                if isinstance(m.get("batch_mean"), (int, float)):
                    batch.add_metric([eid], float(m["batch_mean"]))
                if isinstance(m.get("busy"), (int, float)):
                    busy.add_metric([eid], float(m["busy"]))
            yield from per_engine.values()
            yield from (depth, slots, batch, busy)
            now = time.monotonic()
            fps = GaugeMetricFamily("graphflow_stream_fps", "frames per second at the end of the graph", labels=["stream"])
            frames = CounterMetricFamily("graphflow_stream_frames", "frames at the end of the graph", labels=["stream"])
            events = CounterMetricFamily("graphflow_stream_events", "analytics events", labels=["stream"])
            latency = HistogramMetricFamily("graphflow_stream_latency_seconds", "capture to end of graph",
                                            labels=["stream"])
            with service.lock:
                meters = dict(service.meters)
            for stream, meter in meters.items():
                fps.add_metric([stream], meter.fps(now))
                frames.add_metric([stream], meter.frames)
                events.add_metric([stream], meter.events)
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), meter.buckets):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                latency.add_metric([stream], buckets, meter.latency_sum)
            yield from (fps, frames, events, latency)

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
