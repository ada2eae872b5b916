"""The batch pipeline: a Scheduler's batches assembled, run on each model instance and finished on threads of their
own, so the accelerator does not wait for the host; worker failures kept for the engine's thread to raise."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from graphflow.batching.scheduler import POLL_S, Queued, Scheduler

log = logging.getLogger(__name__)

ErrorHandler = Callable[[list[Queued], BaseException], None]


class WorkerFailures:
    """Failures of a pipeline's worker threads, kept for the engine's own thread to raise: the runtime then counts
    them and applies the engine's on_error, as for a failure in process()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.texts: list[str] = []

    def add(self, text: str) -> None:
        with self.lock:
            self.texts.append(text)

    def raise_any(self) -> None:
        """Raise the first kept failure (counting the others) and forget them; nothing if none."""
        with self.lock:
            texts, self.texts = self.texts, []
        if texts:
            more = f" (and {len(texts) - 1} more failures)" if len(texts) > 1 else ""
            raise RuntimeError(texts[0] + more)


class Ewma:
    """Exponentially weighted mean of a duration, None until the first sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


class BatchPipeline:
    """Runs a Scheduler's batches on threads — one assembles (stack, upload), one per model instance runs, one
    finishes (per-frame post-processing and send) — so the accelerator does not wait for the host: batch k+1
    is formed and assembled while batch k runs, timed from measured run and assembly times to be ready as an
    instance comes free (and formed no earlier, so its frames are as fresh as they can be). Batches are
    finished in the order they were formed, so frames leave in per-stream order whatever instance ran them.
    A failing batch or frame goes to `on_error` and the pipeline carries on with the next."""

    def __init__(self, scheduler: Scheduler, assemble: Callable[[list[Queued]], Any],
                 runs: Sequence[Callable[[Any], Sequence[Any]]], finish: Callable[[Queued, Any], None],
                 on_error: ErrorHandler, name: str = "batch",
                 spans: Sequence[Callable[[], tuple[float, float] | None] | None] | None = None) -> None:
        if not runs:
            raise ValueError("batch pipeline: needs at least one model instance to run batches")
        self.scheduler = scheduler
        self.cond = scheduler.cond  # one lock for the queues, the hand-off slot and the run estimates
        self.clock = scheduler.clock
        self.assemble, self.runs, self.finish, self.on_error = assemble, list(runs), finish, on_error
        # per instance, optional: after a run on this thread, the device-side (start, end) of its work; busy time
        # is then what the device did, not how long the host waited (None from it: the host's interval counts)
        self.spans = list(spans) if spans is not None else [None] * len(self.runs)
        if len(self.spans) != len(self.runs):
            raise ValueError(f"batch pipeline: {len(self.spans)} span readers for {len(self.runs)} instances")
        self._slot: tuple[int, list[Queued], Any] | None = None  # assembled, waiting for an instance
        self._formed = 0  # batches formed (their sequence numbers)
        self._assembled_all = False
        self._busy: dict[int, float | None] = {}  # running instance → estimated end of its batch (None: unknown)
        self._run_s: dict[int, Ewma] = {}  # run time by batch size
        self._assemble_s = Ewma()
        self._to_finish: queue.Queue = queue.Queue(maxsize=len(self.runs))  # bounded: back-pressure from sends
        self._abort = threading.Event()
        self.threads = [threading.Thread(target=self._assembling, name=f"{name}:assemble", daemon=True)]
        self.threads += [threading.Thread(target=self._running, args=(i,), name=f"{name}:run{i}", daemon=True)
                         for i in range(len(self.runs))]
        self.threads.append(threading.Thread(target=self._finishing, name=f"{name}:finish", daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def drain(self, stop: threading.Event | None = None) -> bool:
        """Close the input and wait until every queued frame is finished; aborts and returns False on `stop`."""
        self.scheduler.close()
        for t in self.threads:
            while t.is_alive():
                t.join(POLL_S)
                if stop is not None and stop.is_set():
                    self.stop()
                    return False
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Abandon queued work and end the threads."""
        self._abort.set()
        self.scheduler.abort()
        for t in self.threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    def _fail(self, batch: list[Queued], exc: BaseException) -> None:
        self.scheduler.stats.failed(len(batch))
        try:
            self.on_error(batch, exc)
        except Exception:  # the handler must not end the stage
            log.exception("error handler failed")

    def _estimate(self, size: int) -> float | None:
        """Expected run time of a batch of `size`: measured for that size, else scaled from the nearest one."""
        if size in self._run_s:
            return self._run_s[size].value
        if not self._run_s:
            return None
        near = min(self._run_s, key=lambda n: abs(n - size))
        return self._run_s[near].value * size / near

    def _ready_at(self) -> float | None:
        """When the next batch should be formed (called under `cond`): None (wait for a notify) while an
        assembled batch still waits; now if an instance is idle; else just before the first should end."""
        if self._slot is not None:
            return None
        ends = list(self._busy.values())
        if len(ends) < len(self.runs) or None in ends or self._assemble_s.value is None:
            return 0.0
        return min(ends) - 1.5 * self._assemble_s.value - 0.002

    def _assembling(self) -> None:
        while (batch := self.scheduler.take(self._ready_at)) is not None:
            seq, self._formed = self._formed, self._formed + 1
            t0 = self.clock()
            try:
                prepared = self.assemble(batch)
            except Exception as exc:
                self._fail(batch, exc)
                if not self._pass((seq, batch, None)):
                    return
                continue
            with self.cond:
                self._assemble_s.add(self.clock() - t0)
                self.scheduler.lead_s = self._assemble_s.value  # (one float: assigning it is atomic)
                while self._slot is not None and not self._abort.is_set():
                    self.cond.wait(POLL_S)
                if self._abort.is_set():
                    return
                self._slot = (seq, batch, prepared)
                self.cond.notify_all()
        with self.cond:
            self._assembled_all = True
            self.cond.notify_all()

    def _running(self, instance: int) -> None:
        run, span = self.runs[instance], self.spans[instance]
        while True:
            with self.cond:
                while self._slot is None and not self._assembled_all and not self._abort.is_set():
                    self.cond.wait(POLL_S)
                if self._abort.is_set() or self._slot is None:
                    break
                (seq, batch, prepared), self._slot = self._slot, None
                t0 = self.clock()
                estimate = self._estimate(len(batch))
                self._busy[instance] = t0 + estimate if estimate is not None else None
                self.cond.notify_all()
            outputs = None
            try:
                with self.scheduler.stats.measured(span):
                    outputs = run(prepared)
                if len(outputs) != len(batch):
                    raise ValueError(f"backend returned {len(outputs)} outputs for a batch of {len(batch)}")
            except Exception as exc:
                self._fail(batch, exc)
                outputs = None
            with self.cond:
                self._run_s.setdefault(len(batch), Ewma()).add(self.clock() - t0)
                del self._busy[instance]
                self.cond.notify_all()
            if not self._pass((seq, batch, outputs)):
                return
        self._pass(None)

    def _pass(self, job: Any) -> bool:
        """Hand a finished batch (or a runner's end) to the finisher; False when aborted meanwhile."""
        while not self._abort.is_set():
            try:
                self._to_finish.put(job, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _finishing(self) -> None:
        """Finish batches in formation order; a failed batch (outputs None) only moves the order on."""
        waiting: dict[int, tuple[list[Queued], Any]] = {}
        next_seq, ended = 0, 0
        while ended < len(self.runs) and not self._abort.is_set():
            try:
                job = self._to_finish.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if job is None:
                ended += 1
                continue
            waiting[job[0]] = job[1:]
            while next_seq in waiting:
                batch, outputs = waiting.pop(next_seq)
                next_seq += 1
                for entry, output in zip(batch, outputs if outputs is not None else ()):
                    try:
                        self.finish(entry, output)
                    except Exception as exc:
                        self._fail([entry], exc)
                        continue
                    self.scheduler.completed(entry)
