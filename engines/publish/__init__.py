"""`publish`: send results out of the graph through sinks, each one kind declared in one class (`base.Output`).
Kinds: jsonl and mot (files), video and snapshot (video), redis and zmq (brokers), webhook and mqtt (alarms)."""
from graphflow.engines.publish.base import SINKS, check_sink, sink_kinds
from graphflow.engines.publish.engine import Publish

__all__ = ["SINKS", "Publish", "check_sink", "sink_kinds"]
