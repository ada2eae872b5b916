"""Zero-copy shared-memory frame channels: handles, fan-out, forwarding, policies, shapes, reclamation."""
import gc
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from graphflow import graph
from graphflow import runtime
from graphflow.runtime.links import decode, encode
from graphflow.message import Message
from graphflow.runtime.shm import ShmContext


HOSTS = ("prod", "a", "b", "victim")


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        gc.collect()
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def hosts(tmp_path):
    """Producer and two consumer contexts in this process (a handle maps the same way through /proc/self)."""
    made = [ShmContext(name, str(tmp_path), HOSTS) for name in ("prod", "a", "b")]
    yield made
    for h in made:
        h.close()


def send(msg, src, holder, dst):
    """Encode with the sender's context counting `holder`, decode in the receiver's context."""
    frames = encode(msg, src, holder)
    return decode([bytes(f) if isinstance(f, memoryview) else f for f in frames], dst)


def test_frame_crosses_as_a_handle_and_maps_the_same_memory(hosts):
    prod, a, _ = hosts
    pool = prod.pool("cam.out", 4)
    frame = pool.acquire((1080, 1920, 3), np.dtype(np.uint8))
    frame[...] = 7
    frames = encode(Message("s", 1, arrays={"image": frame}), prod, "a")
    assert len(frames) == 1 and len(frames[0]) < 300  # only the header travels, not 6 MB
    got = decode(frames, a).arrays["image"]
    assert got.shape == (1080, 1920, 3) and not got.flags.writeable
    frame[0, 0, 0] = 99  # same physical memory: the producer's write is visible to the consumer
    assert got[0, 0, 0] == 99 and int(got[1:].max()) == 7
    del frame
    assert pool.in_use() == 1  # the consumer still holds it
    del got
    assert wait_until(lambda: pool.in_use() == 0)


def test_a_view_holds_the_slot_after_its_array_is_gone(hosts):
    """Engines slice frames (crops, channels): a view alone must keep the slot, on both sides."""
    prod, a, _ = hosts
    pool = prod.pool("cam.out", 4)
    frame = pool.acquire((100, 1000), np.dtype(np.uint8))
    frame[...] = 3
    crop = frame[10:20, 5:50]
    got = send(Message("s", 1, arrays={"image": frame}), prod, "a", a).arrays["image"]
    remote_crop = got.reshape(1000, 100)[:5]
    del frame, got
    gc.collect()
    assert pool.in_use() == 1 and int(crop.max()) == 3 and int(remote_crop.max()) == 3
    del crop
    gc.collect()
    assert pool.in_use() == 1  # the consumer's view still reads it
    del remote_crop
    assert wait_until(lambda: pool.in_use() == 0)


def test_small_arrays_travel_inline(hosts):
    prod, a, _ = hosts
    small = np.arange(10, dtype=np.float32)
    frames = encode(Message("s", 0, arrays={"boxes": small}), prod, "a")
    assert len(frames) == 2
    assert np.array_equal(decode(frames, a).arrays["boxes"], small)


def test_fan_out_releases_after_the_last_consumer(hosts):
    prod, a, b = hosts
    pool = prod.pool("cam.out", 2)
    frame = pool.acquire((360, 640, 3), np.dtype(np.uint8))
    frame[...] = 3
    msg = Message("s", 0, arrays={"image": frame})
    in_a = send(msg, prod, "a", a).arrays["image"]
    in_b = send(msg, prod, "b", b).arrays["image"]
    del frame, msg
    del in_a
    gc.collect()
    time.sleep(0.1)
    assert pool.in_use() == 1  # b still reads it
    assert int(in_b.sum()) == 3 * 360 * 640 * 3
    del in_b
    assert wait_until(lambda: pool.in_use() == 0)


def test_forwarding_an_unchanged_frame_does_not_copy_and_keeps_the_slot(hosts):
    prod, a, b = hosts
    pool = prod.pool("cam.out", 2)
    frame = pool.acquire((720, 1280, 3), np.dtype(np.uint8))
    frame[...] = 5
    in_a = send(Message("s", 0, arrays={"image": frame}), prod, "a", a)
    del frame
    frames = encode(in_a, a, "b")  # a forwards the frame it received to b
    assert len(frames) == 1  # still a handle to the producer's slot, no bytes
    in_b = decode(frames, b).arrays["image"]
    del in_a
    gc.collect()
    time.sleep(0.2)
    assert pool.in_use() == 1  # a released, but b (counted by a's forward) still holds it
    assert int(in_b[0, 0, 0]) == 5
    del in_b
    assert wait_until(lambda: pool.in_use() == 0)


def test_new_frame_made_by_a_consumer_goes_into_its_own_pool(hosts):
    prod, a, b = hosts
    got = send(Message("s", 0, arrays={"image": np.full((360, 640, 3), 2, np.uint8)}), prod, "a", a)  # inline
    made = a.place(got.arrays["image"] * 2, a.pool("dbl.out", 2), None, None)
    out = send(Message("s", 0, arrays={"image": made}), a, "b", b).arrays["image"]
    assert int(out.max()) == 4 and a.pools["dbl.out"].in_use() == 1


def test_frames_of_different_shapes_and_dtypes_share_a_channel(hosts):
    prod, a, _ = hosts
    pool = prod.pool("cam.out", 2)
    seen = []
    for shape, dtype in (((360, 640, 3), np.uint8), ((2160, 3840, 3), np.uint8), ((3, 416, 416), np.float32),
                         ((1080, 1920, 3), np.uint8), ((2160, 3840, 3), np.uint8)):
        arr = pool.acquire(shape, np.dtype(dtype))
        arr[...] = len(seen) + 1
        got = send(Message("s", len(seen), arrays={"x": arr}), prod, "a", a).arrays["x"]
        assert got.shape == shape and got.dtype == dtype and float(got.min()) == float(got.max()) == len(seen) + 1
        seen.append(got)
        del arr, got
        if len(seen) == 2:
            seen.clear()  # release both so the pool (2 slots) can grow a slot for the next size
            assert wait_until(lambda: pool.in_use() == 0)
    assert len(pool.slots) == 2


def test_exhausted_pool_blocks_until_a_release(hosts):
    prod, _, _ = hosts
    pool = prod.pool("cam.out", 2)
    held = [pool.acquire((100, 1000), np.dtype(np.uint8)) for _ in range(2)]
    assert pool.acquire((100, 1000), np.dtype(np.uint8), wait=0.1) is None  # bounded: no third slot
    threading.Timer(0.2, held.pop).start()
    t0 = time.monotonic()
    got = pool.acquire((100, 1000), np.dtype(np.uint8), stop=threading.Event())
    assert got is not None and time.monotonic() - t0 >= 0.15 and pool.waits == 2
    assert pool.in_use() == 2


def test_waiting_producer_wakes_for_a_few_releases_and_still_for_a_single_one(hosts):
    """A waiting owner asks to be woken after a few releases (not one wake-up per frame), but a consumer
    that gives back only one slot must still unblock it promptly."""
    prod, _, _ = hosts
    pool = prod.pool("cam.out", 16)
    held = [pool.acquire((100, 1000), np.dtype(np.uint8)) for _ in range(16)]
    for release in ([held.pop], [held.pop] * 4):
        threading.Timer(0.1, lambda: [f() for f in release]).start()
        t0 = time.monotonic()
        got = pool.acquire((100, 1000), np.dtype(np.uint8), stop=threading.Event())
        waited = time.monotonic() - t0
        assert got is not None and 0.09 <= waited < 0.5, waited
        held.append(got)
    assert pool.ctl.cells[pool.ctl.waiting] == 0  # not waiting any more: releases stop ringing


def _hold_and_wait(rundir, handles, ready):
    ctx = ShmContext("victim", rundir, HOSTS)  # writes its pid file
    held = [ctx.attach(h, "|u1", [100, 1000]) for h in handles.get(timeout=30)]
    assert all(int(a[0, 0]) == 1 for a in held)
    ready.set()
    time.sleep(60)


def test_slots_held_by_a_killed_process_are_reclaimed(hosts, tmp_path):
    prod, _, _ = hosts
    pool = prod.pool("cam.out", 3)
    spawn = mp.get_context("spawn")
    ready, handles = spawn.Event(), spawn.Queue()
    child = spawn.Process(target=_hold_and_wait, args=(str(tmp_path), handles, ready), daemon=True)
    child.start()
    assert wait_until(lambda: (tmp_path / "pid-victim").exists(), 30)
    sent = []
    for _ in range(3):
        arr = pool.acquire((100, 1000), np.dtype(np.uint8))
        arr[...] = 1
        sent.append(prod.handle(arr, "victim"))
    handles.put(sent)
    del arr
    assert ready.wait(30)
    assert pool.acquire((100, 1000), np.dtype(np.uint8), wait=0.2) is None  # all three held by the child
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    assert pool.acquire((100, 1000), np.dtype(np.uint8), wait=3) is not None
    assert pool.reclaimed == 3


# --- through the runtime ----------------------------------------------------------------------

ENGINES = '''
import numpy as np
from graphflow import Engine, Param

class Stamp(Engine):
    """Writes frame number into a new frame of a stream-dependent size (shm slot via alloc)."""
    inputs = ()
    count = Param(int, 20)
    def generate(self):
        from graphflow import Message
        for i in range(self.count):
            for s, (h, w) in enumerate(((360, 640), (720, 1280))):
                img = self.alloc((h, w, 3), np.uint8)
                img[...] = i % 251
                yield Message(f"s{s}", i, arrays={"image": img})

class Check(Engine):
    """Verifies every frame's content and records its checksum and whether it is read-only."""
    def process(self, msg):
        img = msg.arrays["image"]
        msg.data["ok"] = bool(img.min() == img.max() == msg.seq % 251)
        msg.data["ro"] = not img.flags.writeable
        msg.data["shape"] = list(img.shape)
        self.send(msg)

class Double(Engine):
    """Makes a new frame (a new slot in this process's pool)."""
    def process(self, msg):
        out = self.alloc(msg.arrays["image"].shape, np.uint8)
        np.multiply(msg.arrays["image"], 1, out=out)
        msg.arrays["image"] = out
        self.send(msg)
'''


def run_graph(doc):
    summary = runtime.run(graph.build(doc, "shm-test"), handle_signals=False)
    assert not summary.failed, summary.errors
    return summary


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_runtime_fan_out_forwarding_and_new_frames_across_processes(tmp_path, user_module):
    user_module("shmengines", ENGINES)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    doc = {"engines": {
        "src": {"type": "shmengines:Stamp", "placement": "process"},
        "fwd": {"type": "shmengines:Check", "placement": "process"},        # forwards unchanged
        "dbl": {"type": "shmengines:Double", "placement": "process"},       # new frame, own pool
        "chk": {"type": "shmengines:Check", "placement": "process"},
        "out_a": {"type": "sink", "params": {"path": str(a)}},
        "out_b": {"type": "sink", "params": {"path": str(b)}}},
        "connections": [["src.out", "fwd.in"], ["src.out", "dbl.in"], ["fwd.out", "out_a.in"],
                        ["dbl.out", "chk.in"], ["chk.out", "out_b.in"]]}
    summary = run_graph(doc)
    for path in (a, b):
        rows = records(path)
        assert len(rows) == 40 and all(r["ok"] and r["ro"] for r in rows)
        assert {tuple(r["shape"]) for r in rows} == {(360, 640, 3), (720, 1280, 3)}
    shm = summary.stats["src"]["metrics"]["shm"]
    assert shm["drops"] == 0


def test_runtime_drop_oldest_with_a_small_pool_stays_bounded_and_counts(tmp_path, user_module):
    user_module("shmengines2", ENGINES + '''
import time
class Slow(Engine):
    outputs = ()
    def process(self, msg):
        time.sleep(0.02)
''')
    doc = {"engines": {
        "src": {"type": "shmengines2:Stamp", "params": {"count": 150}},
        "slow": {"type": "shmengines2:Slow", "placement": "process"}},
        "connections": [{"from": "src.out", "to": "slow.in", "policy": "drop_oldest", "capacity": 2, "slots": 4}]}
    summary = run_graph(doc)
    src, slow = summary.stats["src"], summary.stats["slow"]
    shm = src["metrics"]["shm"]
    assert src["sent"] == 300
    assert slow["received"] < 300 and shm["drops"] > 0
    # every frame is either processed or counted as dropped on the edge: in the inbox, or by the producer
    # (no free slot: it never waits on a drop-policy edge), reported to the consumer
    assert slow["received"] + slow["dropped"] == 300 and slow["dropped"] >= shm["drops"]


def memfds_of_pid(pid):
    try:
        return sum("memfd:graphflow" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def test_no_shared_memory_left_after_a_run_with_a_killed_child(tmp_path, write_graph, user_module):
    user_module("shmengines3", ENGINES)
    before = set(os.listdir("/dev/shm"))
    doc = {"engines": {
        "src": {"type": "shmengines3:Stamp", "placement": "process", "params": {"count": 100000}},
        "chk": {"type": "shmengines3:Check", "placement": "process"},
        "out": {"type": "sink", "params": {"path": str(tmp_path / "o.jsonl")}}},
        "connections": [["src.out", "chk.in"], ["chk.out", "out.in"]],
        "settings": {"shutdown_timeout": 3}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc))],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        children = []
        assert wait_until(lambda: (tmp_path / "o.jsonl").exists() and (tmp_path / "o.jsonl").stat().st_size > 0, 30)
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        held = {pid: memfds_of_pid(pid) for pid in children}
        assert sum(held.values()) > 0  # the producer's slots are memfds while it runs
        os.kill(max(held, key=held.get), signal.SIGKILL)  # kill the process that owns the pool
        proc.wait(30)
    finally:
        proc.kill()
    assert all(not Path(f"/proc/{pid}").exists() or memfds_of_pid(pid) == 0 for pid in children)
    assert set(os.listdir("/dev/shm")) - before == set()
    assert proc.returncode == 1 and "died" in proc.stderr.read()
