"""Cross-stream batching: the knobs (settings), the scheduler that forms batches from every stream's frames, the
pipeline that runs them on worker threads, and the records of it all (stats)."""
from graphflow.batching.pipeline import BatchPipeline, WorkerFailures
from graphflow.batching.scheduler import Queued, Scheduler
from graphflow.batching.settings import Batched, BatchSettings
from graphflow.batching.stats import BatchStats

__all__ = ["BatchPipeline", "BatchSettings", "BatchStats", "Batched", "Queued", "Scheduler", "WorkerFailures"]
