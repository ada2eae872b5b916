"""Rules under hostile or careless input, and the rule state a change keeps: linear-time regexes, bounded zone
checks, class names checked for the service, unchanged rules keeping their counts, hysteresis and cool-down."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from graphflow import ParamError
from graphflow.vision.rules import (MAX_PATTERN, MAX_POINTS, RULE_CLASSES, RuleKind, RuleSet, check_rules,
                                    parse_rules, points_in_polygon, polygon_problem)

W, H, FPS = 1000, 500, 10
ZONE = [[400, 0], [600, 0], [600, 500], [400, 500]]  # x 400..600
LINE = [[0, 250], [600, 250]]  # side A above


def track(tid: int, x: float, y: float, **attributes) -> dict:
    t = {"track_id": tid, "box": [x - 20, y - 80, x + 20, y], "score": 0.9, "class_id": 0, "label": "person"}
    return {**t, "attributes": attributes} if attributes else t


def events(rs: RuleSet, frames: list[list[dict]], start: int = 0, stream: str = "cam") -> list[tuple]:
    """(frame, rule, event, track, extra) of every event of `frames`, numbered from `start`."""
    got = []
    for f, tracks in enumerate(frames, start):
        for ev in rs.evaluate(stream, f, f / FPS, tracks, W, H):
            extra = {k: ev[k] for k in ("direction", "counts", "duration") if k in ev}
            got.append((f, ev["rule"], ev["event"], ev["track_id"], extra))
    return got


def star(n: int, cx: float = 400, cy: float = 400, r: float = 300) -> list[list[float]]:
    """A simple n-cornered star, its points alternating between radii r and r/3."""
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.where(np.arange(n) % 2, r / 3, r)
    return np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1).round(3).tolist()


def refused(rules: list) -> ParamError:
    with pytest.raises(ParamError) as err:
        parse_rules(rules)
    assert "\n" not in str(err.value)
    return err.value


# --- 1. a regex cannot stall the engines ---

def test_a_catastrophic_regex_runs_in_linear_time():
    """`(a+)+$` backtracks exponentially in Python's re (24 a's: seconds, holding the GIL); RE2 answers at once."""
    rs = RuleSet([{"id": "z", "kind": "zone", "polygon": ZONE, "attributes": {"text": {"regex": "(a+)+$"}}}])
    texts = ["a" * 24 + "b", "a" * 20_000 + "b", "a" * 30]
    t0 = time.perf_counter()
    got = [rs.evaluate("cam", i, i / FPS, [track(i, 500, 250, text=text)], W, H) for i, text in enumerate(texts)]
    assert time.perf_counter() - t0 < 0.5
    assert [[e["event"] for e in evs] for evs in got] == [[], [], ["enter"]]  # and it still matches what it should


@pytest.mark.parametrize("pattern, message", [
    (r"(a)\1", r"not a valid regular expression (RE2 syntax): invalid escape sequence: \1"),  # backreference
    ("(?=a)b", "not a valid regular expression (RE2 syntax): invalid perl operator: (?="),  # lookahead
    ("x" * (MAX_PATTERN + 1), f"at most {MAX_PATTERN} characters (got {MAX_PATTERN + 1})"),
    ("a{2000}", "not a valid regular expression (RE2 syntax): invalid repetition size: {2000}"),
])
def test_patterns_re2_cannot_run_safely_are_refused_in_one_line(pattern, message):
    err = refused([{"kind": "zone", "polygon": ZONE, "attributes": {"text": {"regex": pattern}}}])
    assert (err.field, err.message) == ("rules[0].attributes.text.regex", message)


# --- 2. a zone's check is bounded ---

def test_the_largest_zone_validates_fast_and_a_larger_one_is_refused():
    biggest = star(MAX_POINTS)
    t0 = time.perf_counter()
    rule = parse_rules([{"id": "z", "kind": "zone", "polygon": biggest}])[0]
    assert time.perf_counter() - t0 < 0.5  # the old pairwise check took seconds for this one
    assert len(rule.polygon) == MAX_POINTS
    parse_rules([{"id": "z", "kind": "zone", "polygon": biggest + [biggest[0]]}])  # a closing point is not counted
    err = refused([{"id": "z", "kind": "zone", "polygon": star(MAX_POINTS + 2)}])
    assert (err.field, err.message) == ("rules[0].polygon", f"rule 'z': at most {MAX_POINTS} points "
                                                            f"(got {MAX_POINTS + 2})")
    err = refused([{"id": "z", "kind": "crowding", "min_count": 2, "polygon": [[0, 0]] * 100_000}])
    assert err.message == f"rule 'z': at most {MAX_POINTS} points (got 100000)"


def test_a_crossing_in_the_largest_zone_is_named_fast():
    tangled = star(MAX_POINTS)
    tangled[10], tangled[200] = tangled[200], tangled[10]
    t0 = time.perf_counter()
    err = refused([{"id": "z", "kind": "dwell", "seconds": 1, "polygon": tangled}])
    assert time.perf_counter() - t0 < 0.5
    assert re.match(r"rule 'z': its edge from point \d+ to \d+ crosses the edge from point \d+ to \d+ ", err.message)


def test_a_frame_against_the_largest_zone_is_cheap():
    rs = RuleSet([{"id": "z", "kind": "zone", "polygon": star(MAX_POINTS, 500, 250, 240)}])
    rng = np.random.default_rng(0)
    frames = [[track(t, *xy) for t, xy in enumerate(rng.uniform(0, [W, H], (200, 2)).tolist())] for _ in range(20)]
    t0 = time.perf_counter()
    for f, tracks in enumerate(frames):
        rs.evaluate("cam", f, f / FPS, tracks, W, H)
    assert (time.perf_counter() - t0) / len(frames) < 0.05  # 200 tracks × 256 edges: a few milliseconds


def quadratic_problem(points: np.ndarray) -> str | None:
    """The reference: every pair of points, then every pair of edges (the check before the sweep)."""
    n, scale = len(points), float(np.abs(points).max()) or 1.0
    eps = 1e-12 * scale * scale

    def orient(p, q, r):
        cross = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
        return 0 if abs(cross) <= eps else (1 if cross > 0 else -1)

    def on(p, q, r):
        return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])

    for i in range(n):
        for j in range(i + 1, n):
            if np.allclose(points[i], points[j], rtol=0, atol=1e-9 * scale):
                return f"points {i} and {j} are the same point {points[i].tolist()}"
    if all(orient(points[0], points[1], p) == 0 for p in points[2:]):
        return "its points lie on one line: the zone has no area"
    for i in range(n):
        a, b = i, (i + 1) % n
        for k in range(i + 1, n):
            c, d = k, (k + 1) % n
            pa, pb, pc, pd = points[a], points[b], points[c], points[d]
            if d == a or c == b:
                u, v = (pb - pa, pd - pc) if c == b else (pd - pc, pb - pa)
                bad = orient((0, 0), u, v) == 0 and float(np.dot(u, v)) < 0
            else:
                o = orient(pa, pb, pc), orient(pa, pb, pd), orient(pc, pd, pa), orient(pc, pd, pb)
                bad = (o[0] != o[1] and o[2] != o[3] and 0 not in o) or (o[0] == 0 and on(pa, pb, pc)) or \
                    (o[1] == 0 and on(pa, pb, pd)) or (o[2] == 0 and on(pc, pd, pa)) or (o[3] == 0 and on(pc, pd, pb))
            if bad:
                return (f"its edge from point {a} to {b} crosses the edge from point {c} to {d} (a zone's points "
                        "must go once around it, in order)")
    return None


def test_the_sweep_answers_as_the_pairwise_check_on_degenerate_polygons():
    """Random polygons on small integer grids: shared points, collinear and vertical edges, touching corners."""
    rng = np.random.default_rng(7)
    simple = 0
    for _ in range(3000):
        n, grid = int(rng.integers(3, 10)), int(rng.choice([3, 4, 6, 1000]))
        points = rng.integers(0, grid, size=(n, 2)).astype(float)
        want = quadratic_problem(points)
        assert polygon_problem(points) == want, points.tolist()
        simple += want is None
    assert 200 < simple < 2800  # both answers were tried many times


def test_points_in_polygon_outside_the_bounding_box():
    poly = np.array([[10, 10], [20, 10], [20, 20], [10, 20]], float)
    pts = np.array([[15, 15], [5, 15], [25, 15], [15, 25], [15, 5], [10.5, 19.5]], float)
    assert points_in_polygon(pts, poly).tolist() == [True, False, False, False, False, True]
    assert points_in_polygon(np.zeros((0, 2)), poly).tolist() == []


# --- 10a. class names, for the service ---

def test_check_rules_refuses_a_class_the_model_does_not_give():
    coco = {0: "person", 1: "bicycle", 2: "car"}
    rules = [{"id": "door", "kind": "line_cross", "line": LINE, "classes": ["persn"]}]
    with pytest.raises(ParamError) as err:
        check_rules(rules, coco)
    assert str(err.value) == ("rules[0].classes[0]: rule 'door': class 'persn' is not one the detectors upstream "
                              "give (did you mean 'person'?)")
    assert [r.id for r in check_rules([{**rules[0], "classes": ["person", 2]}], coco)] == ["door"]
    assert [r.id for r in check_rules(rules)] == ["door"]  # without the model's classes only the keys are checked
    with pytest.raises(ParamError, match=r"^rules\[0\]\.line: "):
        check_rules([{**rules[0], "line": [[0, 0]]}], coco)  # keys first, as parse_rules


# --- 10b. saving rules keeps the state of the unchanged ones ---

def test_set_rules_keeps_the_state_of_unchanged_rules_and_resets_changed_ones():
    line = {"id": "door", "kind": "line_cross", "line": LINE}
    zone = {"id": "z", "kind": "zone", "polygon": ZONE}
    dwell = {"id": "stay", "kind": "dwell", "polygon": ZONE, "seconds": 1.0}
    rs = RuleSet([])
    rs.set_rules("cam", [line, zone, dwell])
    walker = [[track(1, 250, 200)], [track(1, 250, 300)], [track(2, 500, 250)], [track(2, 500, 250)]]
    assert [(e[1], e[2]) for e in events(rs, walker)] == [("door", "cross"), ("z", "enter")]
    # the zone's polygon changes and a rule is added: only those two start afresh
    wider = {**zone, "polygon": [[300, 0], [700, 0], [700, 500], [300, 500]]}
    rs.set_rules("cam", [dict(line), wider, dict(dwell), {"id": "new", "kind": "zone", "polygon": ZONE}])
    later = [[track(1, 250, 200), track(2, 500, 250)] for _ in range(9)]
    got = events(rs, later, start=4)
    assert got[:3] == [(4, "door", "cross", 1, {"direction": "B->A", "counts": {"A->B": 1, "B->A": 1}}),
                       (4, "z", "enter", 2, {}), (4, "new", "enter", 2, {})]
    # the dwell timer went on from frame 2: 1 s after it, not after the change
    assert got[3:] == [(12, "stay", "dwell", 2, {"duration": 1.0})]
    rs.set_rules("cam", None)  # back to the engine's rules: none
    assert rs.rules_of("cam") == [] and rs.streams["cam"].rules == []


def test_set_rules_with_the_same_specs_changes_nothing():
    specs = [{"id": "door", "kind": "line_cross", "line": LINE}]
    rs = RuleSet(specs)
    events(rs, [[track(1, 300, 200)], [track(1, 300, 300)]])
    rs.set_rules("cam", [dict(specs[0])])  # the stream's own rules now, equal to the engine's
    assert rs.overlay("cam")[0]["counts"] == {"A->B": 1, "B->A": 0}
    rs.set_rules("cam", [{**specs[0], "direction": "A->B"}])  # a changed key: afresh
    assert rs.overlay("cam")[0]["counts"] == {"A->B": 0, "B->A": 0}


# --- C. hysteresis and cool-down ---

def flicker() -> list[list[dict]]:
    """A track walking into the zone, then jittering across its edge (x = 400) before leaving for good."""
    xs = [300, 350, 410, 420, 430, 420, 410, 395, 405, 395, 390, 380, 370, 360]
    return [[track(919, x, 250)] for x in xs]


def test_a_track_flickering_across_a_zone_edge_gives_one_enter_with_hysteresis():
    today = events(RuleSet([{"id": "z", "kind": "zone", "polygon": ZONE}]), flicker())
    assert [(f, e) for f, _, e, _, _ in today] == [(2, "enter"), (7, "exit"), (8, "enter"), (9, "exit")]
    steady = events(RuleSet([{"id": "z", "kind": "zone", "polygon": ZONE, "min_frames": 3}]), flicker())
    # confirmed on the third frame of each run; times and durations from its first frame (2 and 9)
    assert steady == [(4, "z", "enter", 919, {}), (11, "z", "exit", 919, {"duration": 0.7})]


def test_dwell_with_hysteresis_times_the_visit_from_its_first_frame():
    frames = [[track(1, 500 if f != 3 else 300, 250)] for f in range(12)]  # one frame out at 3
    # today the blip ends the first visit: the second (from frame 4) lasts 0.5 s at frame 9
    assert events(RuleSet([{"id": "d", "kind": "dwell", "polygon": ZONE, "seconds": 0.5}]), frames) == [
        (9, "d", "dwell", 1, {"duration": 0.5})]
    # with hysteresis the blip is no exit: one visit from frame 0
    assert events(RuleSet([{"id": "d", "kind": "dwell", "polygon": ZONE, "seconds": 0.5, "min_frames": 2}]),
                  frames) == [(5, "d", "dwell", 1, {"duration": 0.5})]


def test_a_track_jittering_on_a_line_crosses_once_with_hysteresis():
    ys = [200, 240, 260, 245, 255, 262, 270, 280]  # crosses y = 250 at 2, back at 3, again at 4
    frames = [[track(5, 300, y)] for y in ys]
    today = events(RuleSet([{"id": "l", "kind": "line_cross", "line": LINE}]), frames)
    assert [(f, x["direction"]) for f, _, _, _, x in today] == [(2, "A->B"), (3, "B->A"), (4, "A->B")]
    steady = events(RuleSet([{"id": "l", "kind": "line_cross", "line": LINE, "min_frames": 3}]), frames)
    assert steady == [(6, "l", "cross", 5, {"direction": "A->B", "counts": {"A->B": 1, "B->A": 0}})]
    beyond = [[track(6, 700, y)] for y in ys]  # past the segment's end: sides change, nothing crosses
    assert events(RuleSet([{"id": "l", "kind": "line_cross", "line": LINE, "min_frames": 2}]), beyond) == []


def test_cooldown_holds_back_repeats_of_an_event_of_the_same_track():
    rules = [{"id": "z", "kind": "zone", "polygon": ZONE, "cooldown_s": 1.0}]
    got = events(RuleSet(rules), flicker() + [[track(919, x, 250)] for x in (500, 500, 300, 500, 300)])
    # counted from the last event let through: enter 2 and exit 7 pass; enter 8 and exit 9 come within 1 s of
    # them; enter 14 (1.2 s after 2) passes, exit 16 (0.9 s after 7) does not; enter 17 is 0.3 s after 14, exit 18
    # 1.1 s after 7
    assert [(f, e) for f, _, e, _, _ in got] == [(2, "enter"), (7, "exit"), (14, "enter"), (18, "exit")]
    other = [[track(919, 300, 250), track(920, x, 250)] for x in (300, 500, 300, 500)]
    got = events(RuleSet(rules), other)  # another track's events are its own
    assert [(f, e, t) for f, _, e, t, _ in got] == [(1, "enter", 920), (2, "exit", 920)]


# --- A. a rule kind is one class ---

def test_a_new_rule_kind_is_one_class():
    class Loud(RuleKind):
        """Counts the tracks it sees."""

        kind = "test_loud"
        from graphflow.engine import Param
        every = Param(int, 1, ge=1, doc="an event every this many tracks")

        def step(self, frame, rows, points):
            return [self.event(frame, "seen", int(r), points[r]) for r in rows.tolist()[:: self.every]]

    try:
        assert RULE_CLASSES["test_loud"] is Loud and list(Loud.params) == ["every"]
        rs = RuleSet([{"id": "x", "kind": "test_loud", "every": 2}])
        assert len(rs.evaluate("cam", 0, 0.0, [track(i, 100, 100) for i in range(5)])) == 3
        assert refused([{"kind": "test_loud", "every": 0}]).field == "rules[0].every"
        with pytest.raises(TypeError, match="defined twice"):
            type("Again", (RuleKind,), {"kind": "test_loud"})
        from graphflow.cli.graphs import KINDS

        title, listing = KINDS["rule"]  # what `graphflow engines` prints under the rule engine
        assert listing()["test_loud"] == ["Counts the tracks it sees.", "every: int (default 1, ≥ 1) — an event "
                                          "every this many tracks"]
    finally:
        RULE_CLASSES.pop("test_loud", None)
