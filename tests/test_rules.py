"""Rules: hand-checked events per kind on scripted trajectories, in normalised and pixel coordinates."""
from __future__ import annotations

import numpy as np
import pytest

from graphflow.engines.rule import Rule
from graphflow import Message, ParamError
from graphflow.testing import run_engine
from graphflow.vision.rules import RuleSet, points_in_polygon

W, H, FPS = 1000, 500, 10


def track(tid: int, x: float, y: float, label: str = "person", class_id: int = 0) -> dict:
    """A track whose box has its bottom centre (the default anchor) at (x, y)."""
    return {"track_id": tid, "box": [x - 20, y - 80, x + 20, y], "score": 0.9, "class_id": class_id, "label": label}


def walk(tid: int, points: dict[int, tuple[float, float]], **kw) -> dict[int, list[dict]]:
    return {f: [track(tid, x, y, **kw)] for f, (x, y) in points.items()}


def merge(*scripts: dict[int, list[dict]]) -> list[list[dict]]:
    """Per-frame track lists from several per-track scripts."""
    n = max(max(s) for s in scripts) + 1
    return [[t for s in scripts for t in s.get(f, [])] for f in range(n)]


def run(rules: list[dict], frames: list[list[dict]]) -> list[tuple]:
    """(frame, event, track_id, extra...) for every event, in order."""
    rs = RuleSet(rules)
    got = []
    for f, tracks in enumerate(frames):
        for ev in rs.evaluate("cam", f, f / FPS, tracks, W, H):
            assert ev["stream"] == "cam" and ev["frame"] == f and ev["time"] == f / FPS
            extra = {k: ev[k] for k in ("direction", "counts", "duration", "count", "speed", "unit") if k in ev}
            got.append((f, ev["event"], ev["track_id"], extra))
    return got


ZONE_N = [[0.4, 0], [0.6, 0], [0.6, 1], [0.4, 1]]
ZONE_PX = [[400, 0], [600, 0], [600, 500], [400, 500]]
CROSS_ZONE = walk(1, {f: (310 + 60 * f, 250) for f in range(7)})  # x: 310 370 430 490 550 610 670
LINE_N = [[0, 0.5], [0.6, 0.5]]  # y = 250 for x in 0..600; A is above
LINE_PX = [[0, 250], [600, 250]]
DOWN = walk(1, {f: (300, 100 + 40 * f) for f in range(6)})  # y 100..300: crosses at frame 4
UP = walk(2, {f: (300, 400 - 40 * f) for f in range(6)})  # y 400..200: crosses at frame 4
BESIDE = walk(3, {f: (800, 100 + 40 * f) for f in range(6)})  # beyond the segment's end: no event
HALF = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]
LOITER = walk(1, {**{f: (200, 250) for f in range(10)}, 10: (800, 250), **{f: (200, 250) for f in range(11, 21)}})
FULL = [[0, 0], [1, 0], [1, 1], [0, 1]]
SPEEDER = walk(1, {**{f: (100 + 20 * f, 250) for f in range(5)}, **{f: (180, 250) for f in range(5, 10)},
                   **{f: (180 + 20 * (f - 9), 250) for f in range(10, 13)}})

CASES = {
    "zone normalised": ([{"id": "z", "kind": "zone", "polygon": ZONE_N}], merge(CROSS_ZONE),
                        [(2, "enter", 1, {}), (5, "exit", 1, {"duration": 0.3})]),
    "zone pixels": ([{"id": "z", "kind": "zone", "polygon": ZONE_PX}], merge(CROSS_ZONE),
                    [(2, "enter", 1, {}), (5, "exit", 1, {"duration": 0.3})]),
    "line both directions": (
        [{"id": "l", "kind": "line_cross", "line": LINE_N}], merge(DOWN, UP, BESIDE),
        [(4, "cross", 1, {"direction": "A->B", "counts": {"A->B": 1, "B->A": 0}}),
         (4, "cross", 2, {"direction": "B->A", "counts": {"A->B": 1, "B->A": 1}})]),
    "line pixels, A->B only": (
        [{"id": "l", "kind": "line_cross", "line": LINE_PX, "direction": "A->B"}], merge(DOWN, UP, BESIDE),
        [(4, "cross", 1, {"direction": "A->B", "counts": {"A->B": 1, "B->A": 0}})]),
    "line reversed points swap sides": (
        [{"id": "l", "kind": "line_cross", "line": LINE_N[::-1]}], merge(DOWN),
        [(4, "cross", 1, {"direction": "B->A", "counts": {"A->B": 0, "B->A": 1}})]),
    "dwell once per visit": (
        [{"id": "d", "kind": "dwell", "polygon": HALF, "seconds": 0.5}], merge(LOITER),
        [(5, "dwell", 1, {"duration": 0.5}), (16, "dwell", 1, {"duration": 0.5})]),
    "crowding": (
        [{"id": "c", "kind": "crowding", "polygon": FULL, "min_count": 2, "seconds": 0.3}],
        merge(walk(1, {f: (200, 250) for f in range(10)}), walk(2, {f: (700, 250) for f in range(2, 7)})),
        [(5, "crowd_start", None, {"count": 2}), (7, "crowd_end", None, {"count": 1})]),
    "speed px/s": (
        [{"id": "s", "kind": "speed", "max_speed": 150, "window": 0.2}], merge(SPEEDER),
        [(1, "speeding", 1, {"speed": 200.0, "unit": "px/s"}), (11, "speeding", 1, {"speed": 200.0, "unit": "px/s"})]),
    "speed m/s with homography": (
        [{"id": "s", "kind": "speed", "max_speed": 1.5, "window": 0.2,
          "homography": [[0.01, 0, 0], [0, 0.01, 0], [0, 0, 1]]}], merge(SPEEDER),
        [(1, "speeding", 1, {"speed": 2.0, "unit": "m/s"}), (11, "speeding", 1, {"speed": 2.0, "unit": "m/s"})]),
    "class filter": (
        [{"id": "z", "kind": "zone", "polygon": ZONE_N, "classes": ["car", 7]}],
        merge(CROSS_ZONE, walk(2, {f: (310 + 60 * f, 200) for f in range(7)}, label="car", class_id=2),
              walk(3, {f: (310 + 60 * f, 300) for f in range(7)}, label="truck", class_id=7)),
        [(2, "enter", 2, {}), (2, "enter", 3, {}), (5, "exit", 2, {"duration": 0.3}), (5, "exit", 3, {"duration": 0.3})]),
}


@pytest.mark.parametrize("name", CASES)
def test_rule_events(name):
    rules, frames, expected = CASES[name]
    got = run(rules, frames)
    assert [(f, e, t, {k: pytest.approx(v) if isinstance(v, float) else v for k, v in x.items()})
            for f, e, t, x in got] == expected


def test_points_in_polygon_concave():
    poly = np.array([[0, 0], [10, 0], [10, 10], [5, 5], [0, 10]], float)  # a notch from the top
    pts = np.array([[2, 2], [5, 8], [8, 8], [11, 5]], float)
    assert points_in_polygon(pts, poly).tolist() == [True, False, True, False]


def test_state_is_per_stream():
    rs = RuleSet([{"id": "l", "kind": "line_cross", "line": LINE_PX}])
    a = rs.evaluate("a", 0, 0.0, [track(1, 300, 200)])
    b = rs.evaluate("b", 0, 0.0, [track(1, 300, 300)])  # same id on another stream: no crossing
    assert a == b == [] and rs.evaluate("a", 1, 0.1, [track(1, 300, 300)])[0]["counts"] == {"A->B": 1, "B->A": 0}


@pytest.mark.parametrize("rules, field", [
    ([{"kind": "zone", "polygon": [[0, 0], [1, 1]]}], "rules[0].polygon"),
    ([{"kind": "zone", "polygon": FULL}, {"kind": "zone", "polygon": FULL},
      {"kind": "line_cross", "line": [[0, 0], [0, 0]]}], "rules[2].line"),
    ([{"kind": "line_cross", "line": [[0, 0], [1, 1], [2, 2]]}], "rules[0].line"),
    ([{"kind": "line_cross", "line": LINE_N, "direction": "up"}], "rules[0].direction"),
    ([{"kind": "teleport"}], "rules[0].kind"),
    ([{"kind": "dwell", "polygon": FULL}], "rules[0].seconds"),
    ([{"kind": "crowding", "polygon": FULL, "min_count": 0}], "rules[0].min_count"),
    ([{"kind": "speed", "max_speed": 1, "homography": [[1, 0], [0, 1]]}], "rules[0].homography"),
    ([{"id": "x", "kind": "zone", "polygon": FULL}, {"id": "x", "kind": "zone", "polygon": FULL}], "rules[1].id"),
    (["zone"], "rules[0]"),
    ([{"kind": "zone", "polygon": FULL, "line": LINE_N}], "rules[0].line"),
])
def test_rule_validation(rules, field):
    with pytest.raises(ParamError) as err:
        run_engine(Rule, {"rules": rules}, [])
    assert err.value.field == field


def test_rule_engine_times_and_normalised_needs_size():
    rules = [{"id": "z", "kind": "zone", "polygon": ZONE_N}]
    frames = merge(CROSS_ZONE)
    with_pts = [Message("cam", i, pts=100 + i / 5, data={"width": W, "height": H, "tracks": t}) for i, t in enumerate(frames)]
    out = run_engine(Rule, {"rules": rules}, with_pts)["out"]
    events = [e for m in out for e in m.data["events"]]
    assert [(e["event"], e["frame"], e["time"]) for e in events] == [("enter", 2, 100.4), ("exit", 5, 101.0)]
    assert events[0]["position"] == [430.0, 250.0] and events[0]["label"] == "person"
    no_pts = [Message("cam", i, data={"width": W, "height": H, "tracks": t}) for i, t in enumerate(frames)]
    out = run_engine(Rule, {"rules": rules, "fps": 20}, no_pts)["out"]
    assert [e["time"] for m in out for e in m.data["events"]] == [0.1, 0.25]
    with pytest.raises(ValueError, match="width"):
        run_engine(Rule, {"rules": rules}, [Message("cam", 0, data={"tracks": frames[2]})])


def test_track_then_rule_counts_line_crossings():
    """Detections -> track engine -> rule engine: two people crossing a line in opposite directions."""
    from graphflow.engines.track import Track

    def det(x: float, y: float) -> dict:
        return {"box": [x - 20, y - 80, x + 20, y], "score": 0.9, "class_id": 0, "label": "person"}

    msgs = [Message("cam", f, pts=f / FPS, data={"width": W, "height": H,
                                                 "detections": [det(200, 100 + 20 * f), det(450, 400 - 20 * f)]})
            for f in range(15)]
    tracked = run_engine(Track, {"min_hits": 2}, msgs)["out"]
    out = run_engine(Rule, {"rules": [{"id": "door", "kind": "line_cross", "line": LINE_N}]}, tracked)["out"]
    events = [e for m in out for e in m.data["events"]]
    assert [(e["frame"], e["direction"]) for e in events] == [(8, "A->B"), (8, "B->A")]
    assert events[-1]["counts"] == {"A->B": 1, "B->A": 1} and events[0]["track_id"] != events[1]["track_id"]


@pytest.mark.parametrize("kind, geometry, message", [
    ("zone", {"polygon": [[0, 0], [100, 100], [100, 0], [0, 100]]},
     "rule 'r': its edge from point 0 to 1 crosses the edge from point 2 to 3"),
    ("crowding", {"polygon": [[0, 0], [40, 0], [40, 40], [20, 0], [0, 40]], "min_count": 2},
     "rule 'r': its edge from point 0 to 1 crosses the edge from point 2 to 3"),
    ("dwell", {"polygon": [[0, 0], [40, 0], [40, 40], [0, 40], [20, 40]], "seconds": 1},
     "rule 'r': its edge from point 2 to 3 crosses the edge from point 3 to 4"),  # folds back along itself
    ("zone", {"polygon": [[0, 0], [0.5, 0], [0.5, 0], [0, 0.5]]}, "rule 'r': points 1 and 2 are the same point"),
    ("zone", {"polygon": [[0, 0], [0.2, 0.2], [0.4, 0.4]]}, "rule 'r': its points lie on one line"),
    ("line_cross", {"line": [[0.3, 0.5], [0.3, 0.5]]}, "rule 'r': the two points must differ"),
])
def test_degenerate_geometry_is_refused_naming_the_rule(kind, geometry, message):
    field = "line" if kind == "line_cross" else "polygon"
    with pytest.raises(ParamError) as err:
        run_engine(Rule, {"rules": [{"id": "r", "kind": kind, **geometry}]}, [])
    assert err.value.field == f"rules[0].{field}" and err.value.message.startswith(message)
    assert "\n" not in str(err.value)


def test_simple_polygons_pass_and_a_closing_point_is_dropped():
    concave = [[0, 0], [400, 0], [400, 400], [200, 100], [0, 400]]
    rules = [{"id": "z", "kind": "zone", "polygon": concave + [concave[0]]}]
    out = run_engine(Rule, {"rules": rules}, [Message("cam", 0, data={"tracks": [track(1, 200, 50)]})])["out"]
    assert out[0].data["rules"][0]["polygon"] == [[float(x), float(y)] for x, y in concave]
    assert [e["event"] for e in out[0].data["events"]] == ["enter"]


def test_rule_classes_are_checked_against_the_labels_of_the_detector_upstream():
    """The graph calls check_upstream with every engine upstream: a misspelt class fails validation in one line."""
    import json
    from pathlib import Path

    from graphflow import GraphError, graph

    demo = Path(__file__).resolve().parents[1] / "graphs" / "demo.json"
    doc = json.loads(demo.read_text())
    doc["engines"]["zone"]["params"]["rules"][0]["classes"] = ["persn"]
    with pytest.raises(GraphError) as err:
        graph.build(doc, str(demo))
    assert str(err.value) == (f"{demo}: engines.zone.params.rules[0].classes[0]: rule 'door': class 'persn' is not "
                              "one the detectors upstream give (did you mean 'person'?)")
    doc["engines"]["zone"]["params"]["rules"][0]["classes"] = ["person", 2]
    graph.build(doc, str(demo))


def test_check_upstream_uses_what_each_upstream_engine_declares():
    from graphflow.engines.decode import Decode
    from graphflow.engines.detfile import DetFile
    from graphflow.engines.infer import Infer

    def check(classes: list, upstream: list) -> None:
        Rule.check_upstream({"rules": [{"id": "door", "kind": "zone", "polygon": FULL, "classes": classes}]}, upstream)

    infer_people = (Infer, {"model": "yolox-nano", "classes": ["person", 2]})
    check(["person", "car", 0, 2], [(Decode, {}), infer_people])
    with pytest.raises(ParamError, match=r"^rules\[0\]\.classes\[0\]: rule 'door': class 'truck' .*known: person, "
                                         r"car\)$"):
        check(["truck"], [infer_people])
    with pytest.raises(ParamError, match=r"classes\[1\]: rule 'door': class id 5 .*\(ids: 0, 2\)"):
        check([0, 5], [infer_people])
    with pytest.raises(ParamError, match="did you mean 'person'"):
        check(["Person"], [(DetFile, {"path": "det.txt"})])
    check(["anything"], [(Decode, {})])  # nothing upstream declares its classes: names cannot be checked


def test_a_model_files_class_names_come_from_its_metadata_or_a_labels_file(tmp_path):
    """Class names of a model file: its metadata `names` (as Ultralytics writes them), else a labels file given."""
    import onnx

    from graphflow.engines.infer import Infer
    from graphflow.vision.models import MODELS_DIR

    model = onnx.load(str(MODELS_DIR / "yolox_nano.onnx"))
    names = {i: f"thing{i}" for i in range(80)}
    onnx.helper.set_model_props(model, {"names": str(names)})
    path = tmp_path / "named.onnx"
    onnx.save(model, str(path))
    assert Infer.declared_classes({"model": str(path)}) == names
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"kind{i}\n" for i in range(80)))
    assert Infer.declared_classes({"model": str(path), "labels": str(labels)})[79] == "kind79"
    labels.write_text("one\ntwo\n")
    with pytest.raises(ParamError, match="^labels: labels file .*labels.txt: 2 names for a model of 80 classes$"):
        run_engine(Infer, {"model": str(path), "labels": str(labels)}, [])
