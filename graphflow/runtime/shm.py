"""Shared-memory frame pools: a frame crosses a process boundary as a small handle, not as bytes.

A producer process owns one `SlotPool` per output port that has consumers in other processes. A slot is
an anonymous memory file (Linux memfd), so nothing ever appears in /dev/shm and the kernel frees it once
the last process that maps it exits — a SIGKILL cannot leak it. A consumer maps the producer's slot
read-only through /proc/<pid>/fd/<fd> and caches the mapping.

Who holds a slot is counted without any message: each pool has a control table in shared memory with
single-writer cumulative counters — `given[slot, by, to]` (leases of the slot that process `by` handed
to process `to`: the owner's sends and a consumer's forwards) and `released[slot, by]`. A process bumps
its own `given` cell *before* it sends a handle and its own `released` cell when its array dies, so the
other processes are done with a slot exactly when, for every process, what it was given equals what it
released. The owner's own array on a slot is not counted: only the owner asks whether a slot is free,
and a weak reference to that array tells it. Processes are numbered by the graph's sorted host names. A
process that dies holding slots is forgiven its balance (checked through its pid file when the pool
runs dry). A pool outlives its owner's engines until every live process holding one of its frames has
received all it ever will (`holders`, checked by the runtime), and a consumer drops its cached mappings of
producers that are gone when it first maps a new one (a restarted producer)."""
from __future__ import annotations

import logging
import math
import mmap
import os
import resource
import select
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MIN_BYTES = 64 * 1024  # smaller arrays travel inline in the ZeroMQ message: a handle would cost more
PAGE = mmap.PAGESIZE
MAPS_CACHED = 512


class ShmError(Exception):
    """A shared-memory handle could not be mapped (its producer is gone)."""


def _memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(f"graphflow:{name}", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def _open(pid: int, fd: int, writable: bool) -> mmap.mmap:
    """Map another process's memfd through /proc (the whole file)."""
    try:
        f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise ShmError(f"frame pool of process {pid} is gone ({exc.strerror})") from None
    try:
        return mmap.mmap(f, 0, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(f)


@dataclass(frozen=True)
class LeaseTable:
    """A pool's counter table, as mapped in one process: `cells` is the raw int64 table (hot-path reads and
    increments through it are plain Python int operations), `given`/`released` NumPy views of it."""

    cells: memoryview     # given: slots*hosts*hosts cells, then released: slots*hosts cells
    given: np.ndarray     # [slots, hosts, hosts] int64: leases handed by → to
    released: np.ndarray  # [slots, hosts] int64
    hosts: int
    # index of the cell the owner sets while it waits for free slots: 0, or the total release count at
    # which a release should ring its bell (a few releases at once: one wake-up per frame would make
    # producer and consumer take turns instead of running side by side)
    waiting: int

    @classmethod
    def view(cls, mm: mmap.mmap, slots: int, hosts: int) -> LeaseTable:
        given = np.frombuffer(mm, np.int64, slots * hosts * hosts).reshape(slots, hosts, hosts)
        released = np.frombuffer(mm, np.int64, slots * hosts, offset=given.nbytes).reshape(slots, hosts)
        return cls(memoryview(mm).cast("q"), given, released, hosts, given.size + released.size)

    @staticmethod
    def nbytes(slots: int, hosts: int) -> int:
        return 8 * (slots * hosts * (hosts + 1) + 1)  # + the owner's "wake me at" cell

    def released_total(self) -> int:
        return sum(self.cells[self.given.size:self.waiting])

    def given_cell(self, index: int, by: int, to: int) -> int:
        return (index * self.hosts + by) * self.hosts + to

    def released_cell(self, index: int, by: int) -> int:
        return self.given.size + index * self.hosts + by

    def counters(self, index: int) -> tuple[memoryview, memoryview]:
        """Slot `index`'s given cells and released cells: its leases outstanding are sum(given) - sum(released)."""
        h = self.hosts
        g = index * h * h
        r = self.given.size + index * h
        return self.cells[g:g + h * h], self.cells[r:r + h]


# A lease (where a leased array lives) is a plain sequence, sent as is: owner pid, control table fd,
# its slot count, slot fd, slot index, generation. A consumer keeps the list it received.
Lease = Sequence[int]
PID, CTL_FD, INDEX = 0, 1, 4


class _Held(weakref.ref):
    """The weak reference to a leased array, carrying what to count when the array dies."""

    __slots__ = ("key", "lease", "ctl", "cell")


@dataclass
class Slot:
    index: int
    fd: int
    size: int
    mm: mmap.mmap
    gen: int = 0
    lease: tuple[int, ...] = ()  # set with each generation
    mine: _Held | None = None  # the owner's own array on the slot (one at most), weakly
    given: memoryview | None = None  # the slot's counters in the control table (LeaseTable.counters)
    released: memoryview | None = None


class SlotPool:
    """At most `capacity` reusable slots for one output port; a slot grows (new generation) for a bigger frame."""

    def __init__(self, shm: ShmContext, name: str, capacity: int) -> None:
        self.shm, self.name, self.capacity = shm, name, capacity
        hosts = len(shm.hosts)
        self.ctl_fd, self._ctl_mm = _memfd(f"{name}:ctl", LeaseTable.nbytes(capacity, hosts))
        self.ctl = LeaseTable.view(self._ctl_mm, capacity, hosts)
        shm.controls[(os.getpid(), self.ctl_fd)] = self.ctl
        self.bell = bell_path(shm.rundir, os.getpid(), self.ctl_fd)  # a FIFO: releases wake a waiting owner
        os.mkfifo(self.bell)
        self._bell_r = os.open(self.bell, os.O_RDONLY | os.O_NONBLOCK)
        self._bell_w = os.open(self.bell, os.O_WRONLY | os.O_NONBLOCK)  # kept open: reads never see EOF
        self.forgiven = np.zeros((capacity, hosts), np.int64)  # balances of dead processes
        self._forgiven_total = [0] * capacity
        self.slots: list[Slot] = []
        self.lock = threading.Lock()
        self.reclaimed = 0
        self.waits = 0
        self._checked = 0.0
        self._order: deque[int] = deque()  # slots in the order they were handed out, oldest first

    def held(self) -> np.ndarray:
        """[slots, hosts] leases outstanding per slot and process."""
        return self.ctl.given.sum(axis=1) - self.ctl.released - self.forgiven

    def _reclaim_dead(self, held: np.ndarray) -> None:
        """Forgive the balances of processes that are gone (killed, crashed)."""
        for h in np.flatnonzero((held > 0).any(axis=0)):
            host = self.shm.hosts[h]
            if host != self.shm.host and not self.shm.host_alive(host):
                self.reclaimed += int((held[:, h] > 0).sum())
                self.forgiven[:, h] += held[:, h]
                self._forgiven_total = [int(x) for x in self.forgiven.sum(axis=1)]
                log.warning("pool %s: reclaimed slots held by dead process %s", self.name, host)

    def _is_free(self, i: int) -> bool:
        slot = self.slots[i]
        return ((slot.mine is None or slot.mine() is None)
                and sum(slot.given) - sum(slot.released) <= self._forgiven_total[i])

    def _free(self) -> list[bool]:
        """Which slots are free, all at once (a scan slot by slot costs a microsecond each)."""
        balanced = (self.held()[:len(self.slots)].sum(axis=1) <= 0).tolist()
        return [b and (s.mine is None or s.mine() is None) for b, s in zip(balanced, self.slots)]

    def _pick(self, nbytes: int) -> Slot | None:
        """The free slot handed out longest ago that fits (in a steady stream that is the oldest one: it
        is checked first, alone); else a new slot; else a free slot grown."""
        order = self._order
        if order and self.slots[order[0]].size >= nbytes and self._is_free(order[0]):
            order.rotate(-1)
            return self.slots[order[-1]]
        is_free = self._free() if order else []
        free = None
        for i in order:
            if is_free[i]:
                if self.slots[i].size >= nbytes:
                    return self._hand(i)
                free = i if free is None else free
        if len(self.slots) < self.capacity:
            fd, mm = _memfd(self.name, -(-nbytes // PAGE) * PAGE)
            slot = Slot(len(self.slots), fd, len(mm), mm)
            slot.given, slot.released = self.ctl.counters(slot.index)
            self._stamp(slot)
            self.slots.append(slot)
            order.append(slot.index)
            return slot
        if free is None and time.monotonic() - self._checked > 0.5:
            self._checked = time.monotonic()
            self._reclaim_dead(self.held())
            return self._pick(nbytes) if any(self._free()) else None
        if free is not None:  # a frame bigger than every free slot: grow one (consumers remap the new generation)
            slot = self.slots[free]
            slot.size = -(-nbytes // PAGE) * PAGE
            os.ftruncate(slot.fd, slot.size)
            slot.mm = mmap.mmap(slot.fd, slot.size)
            slot.gen += 1
            self._stamp(slot)
            return self._hand(free)
        return None

    def _stamp(self, slot: Slot) -> None:
        slot.lease = (os.getpid(), self.ctl_fd, self.capacity, slot.fd, slot.index, slot.gen)

    def _hand(self, i: int) -> Slot:
        self._order.remove(i)
        self._order.append(i)
        return self.slots[i]

    def acquire(self, shape: tuple[int, ...], dtype: np.dtype, stop: threading.Event | None = None,
                wait: float | None = None) -> np.ndarray | None:
        """A writable array on a free slot; waits for releases up to `wait` seconds (None: until `stop`)."""
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        with self.lock:
            slot = self._pick(nbytes)
            if slot is not None:
                return self._own(slot, shape, dtype)
        return self._wait(nbytes, shape, dtype, stop, wait)

    def _own(self, slot: Slot, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The owner's array on `slot` (called under the lock). The owner's own hold is not counted in
        shared memory: only the owner asks whether a slot is free, so a weak reference says enough."""
        arr = np.ndarray(shape, dtype, slot.mm)
        slot.mine = self.shm.register(arr, slot.lease, self.ctl, own=True)
        return arr

    def _wait(self, nbytes: int, shape: tuple[int, ...], dtype: np.dtype, stop: threading.Event | None,
              wait: float | None) -> np.ndarray | None:
        """The pool ran dry: wait for releases (their bell) up to `wait` seconds (None: until `stop`)."""
        self.waits += 1
        deadline = None if wait is None else time.monotonic() + wait
        cells, flag = self.ctl.cells, self.ctl.waiting
        batch = max(1, min(4, len(self.slots) // 4))  # releases to wait for before waking: hysteresis
        cells[flag] = self.ctl.released_total() + batch  # releases ring from now on: look once more
        try:
            while True:
                with self.lock:
                    slot = self._pick(nbytes)
                    if slot is not None:
                        return self._own(slot, shape, dtype)
                if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() >= deadline):
                    return None
                # a few releases wake us (at most 5 ms later: a consumer may keep frames until it gets more);
                # after that, every release does
                timeout = 0.005 if batch > 1 else 0.05
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - time.monotonic()))
                if select.select([self._bell_r], [], [], timeout)[0]:
                    try:
                        os.read(self._bell_r, 4096)
                    except BlockingIOError:
                        pass
                elif batch > 1:
                    batch = 1
                    cells[flag] = self.ctl.released_total() + 1
        finally:
            cells[flag] = 0

    def in_use(self) -> int:
        with self.lock:
            return sum(not free for free in self._free())

    def holders(self) -> set[str]:
        """The other processes that still hold a frame of this pool (dead ones are forgiven first)."""
        with self.lock:
            held = self.held()
            if (held > 0).any():
                self._reclaim_dead(held)
                held = self.held()
            return {self.shm.hosts[h] for h in np.flatnonzero((held > 0).any(axis=0))}

    def close(self) -> None:
        for mm in [s.mm for s in self.slots] + [self._ctl_mm]:
            try:
                mm.close()
            except BufferError:  # an array still views it; the mapping goes with that array
                pass
        for fd in [s.fd for s in self.slots] + [self.ctl_fd, self._bell_r, self._bell_w]:
            os.close(fd)
        self.slots.clear()
        try:
            os.unlink(self.bell)
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def bell_path(rundir: str, pid: int, ctl_fd: int) -> str:
    return f"{rundir}/bell-{pid}-{ctl_fd}"


def _raise_fd_limit(want: int = 65536) -> None:
    """Each slot mapping holds a file descriptor (Python's mmap keeps a dup), so a process that maps
    many pools needs more than the common soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ShmContext:
    """Per-process shared-memory state: own pools, leased arrays, and cached mappings of other pools."""

    def __init__(self, host: str, rundir: str, hosts: Sequence[str]) -> None:
        self.host, self.rundir = host, rundir
        self.hosts = sorted(set(hosts) | {host})
        self.index = self.hosts.index(host)
        self._host_index = {h: i for i, h in enumerate(self.hosts)}
        self.pools: dict[str, SlotPool] = {}
        self.controls: dict[tuple[int, int], LeaseTable] = {}
        self.leases: dict[int, _Held] = {}  # id(array) → its lease, while the array lives
        self.maps: OrderedDict[tuple[int, int], tuple[int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._counts: deque[tuple[memoryview, int]] = deque()
        self._bells: dict[tuple[int, int], int] = {}  # (owner pid, ctl fd) → write end of its FIFO
        self._mapped_pids: set[int] = set()  # producers whose pools this process maps
        Path(rundir, f"pid-{host}").write_text(str(os.getpid()))
        _raise_fd_limit()

    def pool(self, name: str, slots: int) -> SlotPool:
        with self._lock:
            if name not in self.pools:
                self.pools[name] = SlotPool(self, name, slots)
            return self.pools[name]

    def register(self, arr: np.ndarray, lease: Lease, ctl: LeaseTable, own: bool = False) -> _Held:
        """Remember `arr` as leased; when it dies (in any thread, even inside GC) count the release
        (the owner's own array: only forget it, and wake the owner if it waits)."""
        held = _Held(arr, self._dead_own if own else self._dead)
        held.key, held.lease, held.ctl = id(arr), lease, ctl
        held.cell = -1 if own else ctl.released_cell(lease[INDEX], self.index)
        self.leases[held.key] = held
        return held

    def _forget(self, held: _Held) -> None:
        if self.leases.get(held.key) is held:
            del self.leases[held.key]

    def _dead(self, held: _Held) -> None:
        self._forget(held)
        ctl = held.ctl
        self.bump(ctl.cells, held.cell)
        wake_at = ctl.cells[ctl.waiting]
        if wake_at and ctl.released_total() >= wake_at:
            self._ring(held.lease[PID], held.lease[CTL_FD])

    def _dead_own(self, held: _Held) -> None:
        self._forget(held)
        if held.ctl.cells[held.ctl.waiting]:
            self._ring(held.lease[PID], held.lease[CTL_FD])

    def _ring(self, pid: int, ctl_fd: int) -> None:
        """Wake the owner of a pool that waits for a free slot (a byte into its FIFO; never blocks)."""
        fd = self._bells.get((pid, ctl_fd))
        try:
            if fd is None:
                fd = self._bells[(pid, ctl_fd)] = os.open(bell_path(self.rundir, pid, ctl_fd),
                                                            os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or the owner is gone
            pass

    def bump(self, cells: memoryview, cell: int) -> None:
        """+1 on one of this process's counter cells, never losing an update to another thread. Safe in a
        finalizer: whoever finds the lock taken (another thread, or this one deeper in the stack) leaves
        the increment queued, and the holder applies it before letting go."""
        if self._count_lock.acquire(False):  # the common case: nobody else is counting
            try:
                cells[cell] += 1
                while self._counts:
                    c, k = self._counts.popleft()
                    c[k] += 1
            finally:
                self._count_lock.release()
        else:
            self._counts.append((cells, cell))
        while self._counts and self._count_lock.acquire(False):
            try:
                while self._counts:
                    c, k = self._counts.popleft()
                    c[k] += 1
            finally:
                self._count_lock.release()

    def host_alive(self, host: str) -> bool:
        try:
            pid = int(Path(self.rundir, f"pid-{host}").read_text())
        except (OSError, ValueError):
            return True  # unknown: never reclaim on a guess
        return pid_alive(pid)

    # --- producer side -----------------------------------------------------------------------
    def place(self, arr: np.ndarray, pool: SlotPool, stop: threading.Event | None, wait: float | None) -> np.ndarray | None:
        """`arr` as a leased array: itself if already leased or small, else copied once into a slot."""
        if arr.nbytes < MIN_BYTES or id(arr) in self.leases or not isinstance(arr, np.ndarray):
            return arr  # (a GPU array is refused with a clear error when it is encoded)
        slot = pool.acquire(arr.shape, arr.dtype, stop, wait)
        if slot is not None:
            np.copyto(slot, arr)
        return slot

    def handle(self, arr: np.ndarray, host: str) -> list[int] | None:
        """The wire handle of a leased array, counted as handed to `host` before it travels; None if the
        array is not leased (it then travels inline)."""
        held = self.leases.get(id(arr))
        if held is None:
            return None
        ctl = held.ctl
        self.bump(ctl.cells, ctl.given_cell(held.lease[INDEX], self.index, self._host_index[host]))
        return held.lease

    # --- consumer side -----------------------------------------------------------------------
    def _mapped(self, pid: int, fd: int, gen: int, writable: bool) -> mmap.mmap:
        if pid not in self._mapped_pids:
            self._forget_dead()  # a producer not seen before: often a restart, and the old incarnation is gone
            self._mapped_pids.add(pid)
        cached = self.maps.get((pid, fd))
        if cached is None or cached[0] != gen:
            self.maps[(pid, fd)] = cached = (gen, _open(pid, fd, writable))
            if len(self.maps) > MAPS_CACHED:
                self.maps.popitem(last=False)
        return cached[1]

    def _forget_dead(self) -> None:
        """Drop cached mappings and control tables of producers that are gone: an array still on one keeps
        its mapping alive until it dies, and then the memory goes back to the system."""
        for pid in [p for p in list(self._mapped_pids) if not pid_alive(p)]:
            self._mapped_pids.discard(pid)
            for cache in (self.maps, self.controls):  # other threads may map at the same time: snapshots, pop
                for key in [k for k in list(cache) if k[0] == pid]:
                    cache.pop(key, None)

    def attach(self, handle: Lease, dtype: str, shape: list[int]) -> np.ndarray:
        """A read-only array on another process's slot; its release is counted when the array dies."""
        pid, ctl_fd, slots, fd, _, gen = handle
        ctl = self.controls.get((pid, ctl_fd))
        if ctl is None:
            ctl = self.controls[(pid, ctl_fd)] = LeaseTable.view(
                self._mapped(pid, ctl_fd, -1, writable=True), slots, len(self.hosts))
        arr = np.ndarray(shape, dtype, self._mapped(pid, fd, gen, writable=False))
        self.register(arr, handle, ctl)
        return arr

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        for fd in self._bells.values():
            os.close(fd)
        self._bells.clear()
        self._mapped_pids.clear()
        self.maps.clear()
        self.controls.clear()
