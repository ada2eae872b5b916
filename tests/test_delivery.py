"""The delivery contract across processes: nothing lost and nothing hung behind a slow consumer, end of stream
acknowledged, drop policies fair per stream and never throttling the producer, dead producers' memory let go."""
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from graphflow.runtime.links import Inbox, StreamQueue
from graphflow.message import EOS, Message
from graphflow.runtime.shm import ShmContext

ENGINES = textwrap.dedent('''
    import json, time
    import numpy as np
    from graphflow import Engine, Message, Param

    class Slow(Engine):
        """Takes `delay` s per message; writes stream, seq, the frame's mark, when it was sent and when done."""
        outputs = ()
        path = Param(str)
        delay = Param(float, 0.05)

        def setup(self):
            self.f = open(self.path, "w", buffering=1)

        def process(self, msg):
            time.sleep(self.delay)
            img = msg.arrays.get("image")
            mark = int(img[0, 0, 0]) if img is not None else -1
            self.f.write(json.dumps([msg.stream, msg.seq, mark, msg.times["src"], time.time()]) + "\\n")

        def teardown(self):
            self.f.close()

    class Forward(Engine):
        """Passes every message on unchanged."""
        def process(self, msg):
            self.send(msg)

    class Bursty(Engine):
        """Four cameras cam0..cam3 at rates 1:2:4:8 (messages per tick), `ticks` ticks `period` s apart, frames optional."""
        inputs = ()
        ticks = Param(int, 100)
        period = Param(float, 0.02)
        shape = Param(list, [])

        def generate(self):
            seq = {}
            start = time.monotonic()
            for t in range(self.ticks):
                while time.monotonic() < start + t * self.period:
                    time.sleep(0.002)
                for j in range(8):
                    for k in range(4):
                        if j % (8 >> k) == 0:
                            stream = f"cam{k}"
                            n = seq[stream] = seq.get(stream, -1) + 1
                            msg = Message(stream, n)
                            if self.shape:
                                img = self.alloc(tuple(self.shape), np.uint8)
                                img[0, 0, 0] = n % 251
                                msg.arrays["image"] = img
                            yield msg
''')


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def launch(tmp_path, doc, guard=60):
    """Run `doc` with `graphflow launch` (hang guard: `guard` s); returns (exit code, stderr, stats per engine)."""
    (tmp_path / "delivery_engines.py").write_text(ENGINES)
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(doc))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    stats = tmp_path / "stats.json"
    done = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(path), "--stats", str(stats)],
                          capture_output=True, text=True, timeout=guard, env=env)
    return done.returncode, done.stderr, json.loads(stats.read_text())["engines"]


def slow_doc(out, placement, count, shape, delay, **edge):
    return {"settings": {"shutdown_timeout": 1},  # short: the contract must not depend on it
            "engines": {"src": {"type": "source", "placement": "process", "params": {"count": count, "shape": shape}},
                        "slow": {"type": "delivery_engines:Slow", "placement": placement,
                                 "params": {"path": str(out), "delay": delay}}},
            "connections": [{"from": "src", "to": "slow", **edge}]}


@pytest.mark.parametrize("source, consumer, count, shape", [
    ("process", "process", 24, [1080, 1920, 3]),
    ("process", "thread", 50, [360, 640, 3]),
    ("thread", "process", 50, [360, 640, 3]),  # the launcher's own engines keep their pools for the consumer too
])
def test_a_source_delivers_every_frame_to_a_slow_consumer_in_another_process(tmp_path, source, consumer, count, shape):
    """Frames in shared memory (a slot each) to a consumer in another process, many times slower and reading one at
    a time: the source is done long before the consumer has even mapped most of its frames, and still every frame
    arrives, in order, and the run ends cleanly."""
    out = tmp_path / "out.jsonl"
    doc = slow_doc(out, consumer, count, shape, 0.06, slots=count, capacity=1)
    doc["engines"]["src"]["placement"] = source
    code, err, stats = launch(tmp_path, doc)
    assert code == 0, err
    assert [r[1] for r in rows(out)] == list(range(count))
    assert stats["src"]["sent"] == stats["slow"]["received"] == count and stats["slow"]["dropped"] == 0


def test_a_forwarded_frame_outlives_its_producer_until_the_last_consumer_has_it(tmp_path):
    """source → forward (fast, passes frames on unchanged) → slow, each in its own process: the frames the slow
    consumer gets are the source's slots, so the source stays until the slow consumer has received them all."""
    out = tmp_path / "out.jsonl"
    doc = slow_doc(out, "process", 30, [360, 640, 3], 0.08, slots=30)
    doc["engines"]["fwd"] = {"type": "delivery_engines:Forward", "placement": "process"}
    doc["connections"] = [["src", "fwd"], {"from": "fwd", "to": "slow", "capacity": 1}]
    code, err, stats = launch(tmp_path, doc)
    assert code == 0, err
    assert [r[1] for r in rows(out)] == list(range(30))


def test_end_of_stream_across_processes_with_4k_frames(tmp_path):
    """4K frames (25 MB slots, one per frame) from a process to a slow process: all arrive, and the end of stream,
    though most of them are first mapped after the source is done."""
    out = tmp_path / "out.jsonl"
    code, err, stats = launch(tmp_path, slow_doc(out, "process", 10, [2160, 3840, 3], 0.25, slots=10, capacity=1))
    assert code == 0, err
    assert [r[1] for r in rows(out)] == list(range(10))


def _shares(path):
    return Counter(r[0] for r in rows(path))


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_drop_oldest_gives_each_stream_a_fair_share(tmp_path, placement):
    """Four cameras at rates 1:2:4:8 into a slow consumer under drop_oldest: each camera gets about a quarter of
    what the consumer processes (dropping per connection, the busiest camera took most or all of it). Across
    processes the frames go through shared memory."""
    out = tmp_path / "out.jsonl"
    doc = {"engines": {"src": {"type": "delivery_engines:Bursty", "placement": placement,
                               "params": {"ticks": 120, "period": 0.025, "shape": [100, 240, 3]}},
                       "slow": {"type": "delivery_engines:Slow", "params": {"path": str(out), "delay": 0.025}}},
           "connections": [{"from": "src", "to": "slow", "policy": "drop_oldest", "capacity": 4}]}
    code, err, stats = launch(tmp_path, doc)
    assert code == 0, err
    shares = _shares(out)
    mean = sum(shares.values()) / 4
    assert len(shares) == 4 and mean >= 15, shares
    assert all(abs(n - mean) <= 0.2 * mean for n in shares.values()), shares
    assert stats["slow"]["received"] + stats["slow"]["dropped"] == stats["src"]["sent"] == 120 * 15


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_a_producer_never_waits_for_a_slow_drop_policy_consumer(tmp_path, placement):
    """A source process sends 400 frames at full speed to a consumer taking 0.2 s each (drop_oldest): the source
    sends its last frame before the consumer is a few frames in (a throttled source would have to wait for
    hundreds), and every frame is either processed or counted as dropped."""
    out = tmp_path / "out.jsonl"
    doc = slow_doc(out, placement, 200, [100, 240, 3], 0.2, policy="drop_oldest", capacity=4)
    doc["engines"]["src"]["params"]["streams"] = 2
    code, err, stats = launch(tmp_path, doc)
    assert code == 0, err
    got = rows(out)
    last_sent = max(r[3] for r in got)
    assert sum(r[4] < last_sent for r in got) < 20, got
    assert stats["slow"]["dropped"] > 0
    assert stats["slow"]["received"] + stats["slow"]["dropped"] == stats["src"]["sent"] == 400


def test_latest_keeps_only_the_newest_message_of_each_stream():
    inbox = Inbox([("in", "latest", 8)])
    for seq in range(5):
        for stream in ("a", "b", "c"):
            inbox.put(0, Message(stream, seq))
    inbox.put(0, EOS)
    got = [inbox.get(0) for _ in range(4)]
    assert [(m.stream, m.seq) for _, m in got[:3]] == [("a", 4), ("b", 4), ("c", 4)]
    assert got[3] == (0, EOS)
    assert inbox.dropped == [12] and inbox.dropped_streams == {"a": 4, "b": 4, "c": 4}


def test_drop_oldest_drops_from_the_stream_with_most_queued_and_serves_streams_in_turn():
    q = StreamQueue("drop_oldest", 4)
    drops = Counter()
    for seq in range(6):
        drops.update(q.append(Message("busy", seq)))
    drops.update(q.append(Message("quiet", 0)))
    assert drops == {"busy": 3}  # the busy stream pays for the room, from its oldest
    assert [(m.stream, m.seq) for m in (q.popleft(), q.popleft(), q.popleft(), q.popleft())] == \
        [("busy", 3), ("quiet", 0), ("busy", 4), ("busy", 5)]
    q = StreamQueue("drop_oldest", 2)
    for stream in ("a", "b", "c"):  # more streams than room: the oldest message overall goes
        q.append(Message(stream, 0))
    assert [q.popleft().stream, q.popleft().stream] == ["b", "c"]


PRODUCER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from graphflow.runtime.shm import ShmContext
    ctx = ShmContext("prod", sys.argv[1], ["prod", "a"])
    frame = ctx.pool("incarnation.out", 2).acquire((1080, 1920, 3), np.dtype(np.uint8))
    frame[...] = int(sys.argv[2])
    print(json.dumps(ctx.handle(frame, "a")), flush=True)
    sys.stdin.readline()
''')


def mapped_bytes(name):
    """Bytes of this process's address space mapped from memfds called `name`."""
    total = 0
    for line in open("/proc/self/maps"):
        if f"memfd:graphflow:{name}" in line:
            lo, hi = line.split()[0].split("-")
            total += int(hi, 16) - int(lo, 16)
    return total


def test_a_consumer_lets_go_of_the_pools_of_dead_producer_incarnations(tmp_path):
    """Five producer incarnations one after the other (a restarting engine): the consumer maps each one's frame
    while it lives, and keeps at most one incarnation mapped, not all five."""
    consumer = ShmContext("a", str(tmp_path), ["prod", "a"])
    frame_bytes = 1080 * 1920 * 3
    try:
        for k in range(5):
            child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path), str(k + 1)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            handle = json.loads(child.stdout.readline())
            arr = consumer.attach(handle, "|u1", [1080, 1920, 3])
            assert int(arr[5, 5, 1]) == k + 1
            del arr
            gc.collect()
            child.communicate("\n", timeout=30)
        assert frame_bytes <= mapped_bytes("incarnation.out") < 2 * frame_bytes
    finally:
        consumer.close()
    assert mapped_bytes("incarnation.out") == 0


def test_a_stream_end_is_never_dropped_and_comes_after_its_streams_messages():
    from graphflow.message import StreamEnd

    q = StreamQueue("drop_oldest", 2)
    drops = Counter()
    for seq in range(3):
        drops.update(q.append(Message(stream="a", seq=seq)))
    drops.update(q.append(StreamEnd("a")))
    drops.update(q.append(Message(stream="b", seq=0)))
    drops.update(q.append(Message(stream="b", seq=1)))
    assert drops == {"a": 2, "b": 1}  # the end marker of a never counts against the capacity nor is dropped
    out = [q.popleft() for _ in range(len(q))]
    a = [m for m in out if getattr(m, "stream", "") == "a"]
    assert a[-1] == StreamEnd("a") and [m.seq for m in a[:-1]] == [2]
    latest = StreamQueue("latest", 8)
    latest.append(Message(stream="a", seq=0))
    latest.append(StreamEnd("a"))
    latest.append(Message(stream="a", seq=1))  # the stream id used again after its end: the end stays between
    assert [latest.popleft() for _ in range(len(latest))] == [StreamEnd("a"), Message(stream="a", seq=1)]


def test_a_stream_end_crosses_a_process_boundary():
    from graphflow.runtime.links import decode, encode
    from graphflow.message import StreamEnd

    assert decode(encode(StreamEnd("cam 1"))) == StreamEnd("cam 1")
