"""The per-stream fair queue that drop-policy connections and the batching scheduler share: round order, bounds,
drop policies, kept items, and that nothing is lost or reordered under random use."""
from __future__ import annotations

import random

import pytest

from graphflow.batching import BatchSettings, Scheduler
from graphflow.runtime.links import StreamQueue
from graphflow.runtime.queues import DROP_POLICIES, FairQueue


def drain(q: FairQueue) -> list:
    return [q.popleft() for _ in range(len(q))]


def test_rounds_go_longest_waiting_first_and_a_round_goes_on_across_takes():
    q = FairQueue("block")
    for stamp, (stream, item) in enumerate([("b", "b0"), ("a", "a0"), ("b", "b1"), ("c", "c0"), ("a", "a1")]):
        q.append(stream, item, stamp)
    assert q.oldest() == 0 and [q.popleft(), q.popleft()] == ["b0", "a0"]
    q.append("d", "d0", 5)  # joins mid-round: last of this round
    q.append("b", "b2", 6)  # b had its turn: next round
    assert drain(q) == ["c0", "d0", "b1", "a1", "b2"]  # round two: b's oldest came first
    assert q.streams == {} and q.served == set() and len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()


def test_latest_keeps_the_newest_item_in_the_place_and_waiting_time_of_those_it_replaced():
    q = FairQueue("latest")
    assert q.append("a", "a0", 1.0) == {} and q.append("b", "b0", 2.0) == {}
    assert q.append("a", "a1", 3.0) == {"a": 1} and q.append("a", "a2", 4.0) == {"a": 1}
    assert q.oldest() == 1.0 and len(q) == 2  # a waits since its first frame came
    assert drain(q) == ["a2", "b0"]


def test_bounds_per_stream_and_in_all_drop_from_the_stream_with_most_queued():
    q = FairQueue("drop_oldest", per_stream=2)
    drops = [q.append("a", i, i) for i in range(4)]
    assert drops == [{}, {}, {"a": 1}, {"a": 1}] and drain(q) == [2, 3]
    q = FairQueue("drop_oldest", capacity=3)
    for stamp, stream in enumerate("aabb"):
        dropped = q.append(stream, f"{stream}{stamp}", stamp)
    assert dropped == {"a": 1}  # a tie on counts: the stream waiting longest pays
    q = FairQueue("drop_oldest", capacity=2)
    drops = [q.append(stream, stream, stamp) for stamp, stream in enumerate("abc")]
    assert drops[2] == {"a": 1} and list(q.turn) == ["b", "c"]  # more streams than room: a's only item goes
    assert q.popleft() == "b"
    q.append("a", "a again", 3)  # back, once: after c
    assert drain(q) == ["c", "a again"]


def test_block_never_drops_and_says_when_full():
    q = FairQueue("block", per_stream=2, capacity=3)
    assert not q.full("a")
    q.append("a", 0, 0)
    q.append("a", 1, 1)
    assert q.full("a") and not q.full("b")
    q.append("b", 0, 2)
    assert q.full("b")  # 3 in all
    assert q.append("a", 2, 3) == {} and len(q) == 4  # the owner's call: nothing is dropped for it
    with pytest.raises(ValueError, match="drop policy must be one of block, latest, drop_oldest"):
        FairQueue("newest")


def test_kept_items_are_never_dropped_count_against_no_bound_and_keep_their_place():
    for policy in ("drop_oldest", "latest"):
        q = FairQueue(policy, per_stream=1, capacity=1)
        q.append("a", "a0", 0)
        q.append("a", "end a", 1, keep=True)
        q.append("a", "a1", 2)  # a0 goes; the end stays before a1
        q.append("b", "end b", 3, keep=True)
        assert len(q) == 3 and q.size == 1
        assert drain(q) == ["end a", "end b", "a1"], policy


@pytest.mark.parametrize("policy", DROP_POLICIES)
def test_random_use_loses_nothing_keeps_each_streams_order_and_is_fair(policy):
    """Random appends (kept items among them) and takes: every item comes out once or is reported dropped, each
    stream's items come out in the order they went in, kept items are never dropped."""
    rng = random.Random(7)
    q = FairQueue(policy, per_stream=rng.choice([1, 3, 5]), capacity=rng.choice([4, 8, None]))
    sent: dict[str, list[int]] = {}
    kept: set[tuple[str, int]] = set()
    out: list[tuple[str, int]] = []
    dropped: dict[str, int] = {}
    stamp = 0
    for _ in range(5000):
        if rng.random() < 0.55:
            stream = rng.choice("abcdef")
            n = len(sent.setdefault(stream, []))
            sent[stream].append(n)
            keep = rng.random() < 0.1
            if keep:
                kept.add((stream, n))
            stamp += 1
            for s, k in q.append(stream, (stream, n), stamp, keep).items():
                dropped[s] = dropped.get(s, 0) + k
        elif q:
            out.append(q.popleft())
    out += drain(q)
    for stream, items in sent.items():
        got = [n for s, n in out if s == stream]
        assert got == sorted(got), stream  # FIFO per stream
        assert len(got) + dropped.get(stream, 0) == len(items), stream  # none lost unreported
    assert kept <= set(out)
    if policy == "block":
        assert dropped == {}
    assert len(out) == len(set(out))


def test_a_backlog_drains_in_rounds_each_longest_waiting_first():
    """Each round takes one item of every stream with one queued, in the order of their oldest items' arrival."""
    rng = random.Random(3)
    q = FairQueue("block")
    stamps: dict[str, list[int]] = {}
    for stamp in range(300):
        stream = rng.choice("abcdefgh")
        stamps.setdefault(stream, []).append(stamp)
        q.append(stream, stream, stamp)
    rounds = 0
    while q:
        order = sorted((s for s in stamps if stamps[s]), key=lambda s: stamps[s][0])
        assert [q.popleft() for _ in order] == order
        for s in order:
            stamps[s].pop(0)
        rounds += 1
    assert rounds > 30  # a backlog of many rounds was drained


def test_a_connection_and_the_batching_scheduler_queue_alike():
    """The same arrivals through a drop_oldest connection and a drop_oldest scheduler (bounded alike: one stream,
    so the bound in all is the stream's) come out in the same order with the same drops."""
    conn, sched = StreamQueue("drop_oldest", 3), Scheduler(BatchSettings(max_batch=1, max_wait_ms=0, queue=3,
                                                                         drop="drop_oldest"))
    from graphflow.message import Message

    conn_drops = 0
    for seq in range(7):
        conn_drops += sum(conn.append(Message("a", seq)).values())
        sched.put("a", seq)
    assert [conn.popleft().seq for _ in range(3)] == [q.item for _ in range(3) for q in sched.take()] == [4, 5, 6]
    assert conn_drops == sched.metrics()["dropped"] == 4
    assert isinstance(conn.fair, FairQueue) and isinstance(sched.waiting, FairQueue)
