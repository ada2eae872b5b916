"""Where one engine actor's time goes, for its stats: busy wall time in the engine's own code, and the CPU the
runtime spends working for it (queues, channels, sends)."""
from __future__ import annotations

import threading
import time


class Meter:
    """Times one actor thread's calls into engine code (`enter`/`leave`) and the sends and slot waits around them.

    Busy time is wall time inside engine calls less the time their sends and slot waits took (back-pressure, not
    work). Runtime CPU is the thread's CPU outside engine calls plus the CPU of sends made inside them or from the
    engine's own threads; a source's sends between its engine calls are outside already."""

    def __init__(self) -> None:
        self.owner: threading.Thread | None = None  # the actor's thread, set before it starts
        self.inside = False  # the owner thread is in engine code now
        self.busy_own = 0.0  # busy wall time of the owner thread (the engine's own threads count theirs apart)
        self.engine_cpu = 0.0  # CPU of the owner thread inside engine calls, its sends included
        self.send_cpu = 0.0  # CPU of sends not counted outside engine calls
        self.waited = 0.0  # wall time of sends and slot waits inside engine calls
        self.ended_cpu = 0.0  # the owner thread's CPU when it ended
        self._wall0 = self._cpu0 = self._waited0 = 0.0

    def _mine(self) -> bool:
        return threading.current_thread() is self.owner

    def enter(self) -> None:
        """The owner thread calls into the engine."""
        self._wall0, self._cpu0, self._waited0 = time.perf_counter(), time.thread_time(), self.waited
        self.inside = True

    def leave(self, busy: bool = True) -> None:
        """The engine call returned; `busy=False` when the time was spent waiting for input (a source's heartbeat)."""
        self.inside = False
        self.engine_cpu += time.thread_time() - self._cpu0
        if busy:
            self.busy_own += time.perf_counter() - self._wall0 - (self.waited - self._waited0)

    def send_started(self) -> tuple[float, float, bool] | None:
        """Before a send: a token for `send_ended` when the send is runtime work not counted elsewhere (from inside
        an engine call, or from another thread of the engine), else None."""
        mine = threading.current_thread() is self.owner
        if mine and not self.inside:
            return None
        return time.perf_counter(), time.thread_time(), mine

    def send_ended(self, started: tuple[float, float, bool] | None) -> None:
        """After the send `started` was taken for; called under the actor's send lock, so sums do not race."""
        if started is None:
            return
        wall0, cpu0, mine = started
        self.send_cpu += time.thread_time() - cpu0
        if mine:
            self.waited += time.perf_counter() - wall0

    def slot_waited(self, seconds: float) -> None:
        """Time spent waiting for a free shared-memory slot: back-pressure, taken off busy time."""
        if self.inside and self._mine():
            self.waited += seconds

    def ended(self) -> None:
        """Called last on the owner thread: keep its CPU total."""
        self.ended_cpu = time.thread_time()

    def thread_cpu(self) -> float:
        """The owner thread's CPU time so far (its total once it ended)."""
        owner = self.owner
        if owner is not None and owner.is_alive() and owner.ident is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(owner.ident))
            except OSError:  # the thread ended just now
                pass
        return self.ended_cpu

    def runtime_cpu(self, pump_cpu: float = 0.0) -> float:
        """CPU of the runtime working for this engine: the thread outside engine calls, timed sends, `pump_cpu`
        (the inbox pump's share)."""
        return max(0.0, self.thread_cpu() - self.engine_cpu) + self.send_cpu + pump_cpu
