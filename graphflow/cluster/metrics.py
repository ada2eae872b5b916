"""The cluster front's Prometheus page: every replica's metrics merged, labelled by node."""
from __future__ import annotations

from typing import Any


def render_cluster_metrics(front: Any) -> tuple[bytes, str]:
    """Every replica's metrics with a `node` label, and the cluster's own: replicas up, streams per node, moves."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    with front.lock:
        nodes = [(n.name, n.rid, n.joined, n.capacity, n.metrics, len(front.coordinator.streams_of(n.rid)))
                 for n in front.nodes.values()]
        moves = sum(rec.moves for rec in front.records.values())
        lost = sum(rec.lost for rec in front.records.values())
        waiting = len(front.coordinator.pending)

    class Collector:
        def collect(self) -> Any:
            families: dict[str, Metric] = {}
            for name, _, _, _, text, _ in nodes:
                if not text:
                    continue
                for fam in text_string_to_metric_families(text.decode()):
                    out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                    for sample in fam.samples:
                        out.add_sample(sample.name, {**sample.labels, "node": name}, sample.value)
            yield from families.values()
            up = GaugeMetricFamily("graphflow_cluster_replica_up", "1 when the node's replica runs the graph",
                                   labels=["node", "replica"])
            placed = GaugeMetricFamily("graphflow_cluster_streams", "streams placed on the node's replica",
                                       labels=["node"])
            capacity = GaugeMetricFamily("graphflow_cluster_capacity", "streams the node's replica may take",
                                         labels=["node"])
            for name, rid, joined, cap, _, count in nodes:
                up.add_metric([name, rid], 1.0 if joined else 0.0)
                placed.add_metric([name], count)
                capacity.add_metric([name], cap)
            yield from (up, placed, capacity)
            yield GaugeMetricFamily("graphflow_cluster_streams_waiting", "streams waiting for room on a replica",
                                    value=waiting)
            yield CounterMetricFamily("graphflow_cluster_stream_moves", "streams moved off lost replicas", value=moves)
            yield CounterMetricFamily("graphflow_cluster_frames_lost", "frames in flight on lost replicas", value=lost)

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
