"""Rules: hand-checked events per kind on scripted trajectories, in normalised and pixel coordinates."""
from __future__ import annotations

import numpy as np
import pytest

from graphflow.engines.rule import Rule
from graphflow import Message, ParamError
from graphflow.testing import run_engine
from graphflow.vision.rules import RULE_CLASSES, RuleSet, parse_rules, points_in_polygon

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


# the fewest keys a rule of each kind needs
SMALLEST = {"zone": {"polygon": FULL}, "line_cross": {"line": LINE_N}, "dwell": {"polygon": FULL, "seconds": 1},
            "crowding": {"polygon": FULL, "min_count": 2}, "speed": {"max_speed": 1}}
WRONG_TYPE = {str: 12.5, int: 2.5, float: "fast", list: "x", dict: "x", bool: "yes"}


def test_every_rule_key_is_checked_by_its_declaration():
    """Unknown, required, type, range and choices of every key of every kind come from the declared Params."""
    assert set(SMALLEST) == set(RULE_CLASSES)

    def error(spec: dict) -> ParamError:
        with pytest.raises(ParamError) as err:
            parse_rules([spec])
        return err.value
    for kind, cls in RULE_CLASSES.items():
        smallest = {"kind": kind, **SMALLEST[kind]}
        assert parse_rules([smallest])[0].kind == kind
        got = error({**smallest, "colour": "red"})
        assert (got.field, got.message) == ("rules[0].colour", f"unknown key for a {kind} rule (known: "
                                                               f"{', '.join(cls.keys())})")
        for key, p in cls.keys().items():
            if key == "kind":
                continue
            where = f"rules[0].{key}"
            if p.required:
                got = error({k: v for k, v in smallest.items() if k != key})
                assert (got.field, got.message) == (where, f"required ({p.doc})")
            got = error({**smallest, key: WRONG_TYPE[p.type]})
            assert got.field == where and got.message.startswith("must be ") and "(got " in got.message, got
            if p.ge is not None:
                got = error({**smallest, key: p.ge - 1})
                assert (got.field, got.message) == (where, f"must be ≥ {p.ge} (got {p.type(p.ge - 1)!r})")
            if p.choices:
                got = error({**smallest, key: "sideways"})
                assert (got.field, got.message) == (where, f"must be one of {', '.join(p.choices)} (got 'sideways')")


@pytest.mark.parametrize("rule, field, message", [
    ({"kind": "zone", "polygon": "abc"}, "polygon", "must be a list of [x, y] points (got 'abc')"),
    ({"kind": "zone", "polygon": [[0, 0], [1]]}, "polygon", "must be a list of [x, y] points (got [[0, 0], [1]])"),
    ({"kind": "zone", "polygon": FULL, "classes": [True]}, "classes",
     "must be a list of class ids or labels (got [True])"),
    ({"kind": "zone", "polygon": FULL, "id": False}, "id", "must be a string (got False)"),
    ({"kind": "crowding", "polygon": FULL, "min_count": 2.0}, "min_count", "must be an integer (got 2.0)"),
    ({"kind": "speed", "max_speed": 1, "homography": [[1, 0, 0], [0, 1, 0], [0, 0, 0]]}, "homography",
     "must be an invertible 3x3 matrix of numbers (got [[1, 0, 0], [0, 1, 0], [0, 0, 0]])"),
    ({"kind": "zone", "polygon": FULL, "line": LINE_N}, "line",
     "unknown key for a zone rule (known: id, kind, classes, anchor, attributes, cooldown_s, alarm, polygon, min_frames)"),
    ({"kind": "dwell", "polygon": FULL, "seconds": None}, "seconds",
     "required (seconds a track stays in the zone before the event)"),
])
def test_rule_key_messages(rule, field, message):
    with pytest.raises(ParamError) as err:
        parse_rules([rule])
    assert (err.value.field, err.value.message) == (f"rules[0].{field}", message)


def test_null_keys_take_their_defaults_and_a_number_id_is_text():
    rule, = parse_rules([{"id": 7, "kind": "line_cross", "line": LINE_PX, "direction": None, "classes": None,
                          "anchor": None, "attributes": None}])
    assert (rule.id, rule.direction, rule.classes, rule.anchor, rule.attributes) == ("7", "both", None,
                                                                                     "bottom_center", ())
    rs = RuleSet([rule.spec])
    rs.evaluate("cam", 0, 0.0, [track(1, 300, 200)])
    assert [e["rule"] for e in rs.evaluate("cam", 1, 0.1, [track(1, 300, 300)])] == ["7"]


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

    from graphflow import GraphError
    from graphflow import graph

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
    from graphflow.media.models import MODELS_DIR

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


PLATES = merge(walk(1, {f: (310 + 60 * f, 200) for f in range(7)}, label="car"),
               walk(2, {f: (310 + 60 * f, 250) for f in range(7)}, label="car"),
               walk(3, {f: (310 + 60 * f, 300) for f in range(7)}, label="truck"),
               walk(4, {f: (310 + 60 * f, 350) for f in range(7)}, label="car"))
READ = {1: {"text": "京A12345", "score": 0.93}, 2: {"text": "沪B77777", "score": 0.97},
        3: {"text": "京A99999", "score": 0.41}}  # track 4: never read (no attributes)
for tracks in PLATES:
    for t in tracks:
        if t["track_id"] in READ:
            t["attributes"] = READ[t["track_id"]]


@pytest.mark.parametrize("attributes, entered", [
    ({"text": {"regex": "^京A"}}, [1, 3]),
    ({"text": {"regex": "^京A"}, "score": {"min": 0.5}}, [1]),  # every name must match
    ({"score": {"min": 0.4, "max": 0.95}}, [1, 3]),
    ({"text": "沪B77777"}, [2]),
    ({"text": ["沪B77777", "京A99999"]}, [2, 3]),
    ({"text": {"regex": "^粤"}}, []),
    ({"label": "truck"}, []),  # `label` of the attributes (a classifier's), not the detector's label
    ({"score": {"min": 0}}, [1, 2, 3]),  # a track without attributes never matches
])
def test_rules_count_only_tracks_whose_attributes_match(attributes, entered):
    got = run([{"id": "z", "kind": "zone", "polygon": ZONE_N, "attributes": attributes}], PLATES)
    assert [t for f, e, t, _ in got if e == "enter"] == entered
    assert [t for f, e, t, _ in got if e == "exit"] == entered  # and leave: the filter is not sticky


def test_attribute_filter_combines_with_classes_and_events_carry_the_attributes():
    rules = [{"id": "l", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]], "classes": ["car"],
              "attributes": {"text": {"regex": "^京A"}}}]
    events = RuleSet(rules)
    got = [ev for f, tracks in enumerate(PLATES) for ev in events.evaluate("cam", f, f / FPS, tracks, W, H)]
    assert [(ev["track_id"], ev["direction"]) for ev in got] == [(1, "B->A")]  # 3 reads 京A but is a truck
    assert got[0]["attributes"] == {"text": "京A12345", "score": 0.93}


def test_a_track_counts_from_the_frame_its_attributes_match():
    """A plate read only once the car is inside the zone: the zone sees it enter on that frame."""
    frames = [[dict(t) for t in tracks if t["track_id"] == 1] for tracks in PLATES]
    for f, tracks in enumerate(frames):
        if f < 4:
            del tracks[0]["attributes"]
    got = run([{"id": "z", "kind": "zone", "polygon": ZONE_N, "attributes": {"text": {"regex": "^京A"}}}], frames)
    assert [(f, e) for f, e, _, _ in got] == [(4, "enter"), (5, "exit")]


@pytest.mark.parametrize("attributes, field, message", [
    ("truck", "rules[0].attributes", "must be an object of attribute name"),
    ({}, "rules[0].attributes", "must be an object of attribute name"),
    ({"text": {"regx": "^A"}}, "rules[0].attributes.text.regx", "unknown test (known: regex, min, max)"),
    ({"text": {}}, "rules[0].attributes.text", "needs a test"),
    ({"text": {"regex": "(京"}}, "rules[0].attributes.text.regex", "not a valid regular expression"),
    ({"text": {"regex": 5}}, "rules[0].attributes.text.regex", "must be"),
    ({"score": {"min": "high"}}, "rules[0].attributes.score.min", "must be"),
    ({"score": {"min": 0.9, "max": 0.5}}, "rules[0].attributes.score", "min 0.9 is above max 0.5"),
    ({"label": []}, "rules[0].attributes.label", "a list must hold one or more"),
    ({"label": [["car"]]}, "rules[0].attributes.label", "a list must hold one or more"),
    ({"label": None}, "rules[0].attributes.label", "must be a value, a list of values or an object"),
])
def test_attribute_filters_are_checked_at_load(attributes, field, message):
    with pytest.raises(ParamError) as err:
        run_engine(Rule, {"rules": [{"kind": "zone", "polygon": FULL, "attributes": attributes}]}, [])
    assert err.value.field == field and err.value.message.startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_attribute_filter_in_a_graph_file_fails_validation_in_one_line():
    import json
    from pathlib import Path

    from graphflow import GraphError
    from graphflow import graph

    demo = Path(__file__).resolve().parents[1] / "graphs" / "demo.json"
    doc = json.loads(demo.read_text())
    doc["engines"]["zone"]["params"]["rules"][0]["attributes"] = {"text": {"regex": "[京"}}
    with pytest.raises(GraphError) as err:
        graph.build(doc, str(demo))
    assert str(err.value).startswith(f"{demo}: engines.zone.params.rules[0].attributes.text.regex: not a valid "
                                     "regular expression")
    doc["engines"]["zone"]["params"]["rules"][0]["attributes"] = {"text": {"regex": "^京A"}, "score": {"min": 0.5}}
    graph.build(doc, str(demo))


def test_attribute_filters_apply_live_through_set_rules():
    """What PUT /streams/{id}/rules sends: the rule engine's set_rules command, checked, applied from the next frame."""
    engine = Rule("zone", {"rules": [{"id": "z", "kind": "zone", "polygon": ZONE_N}]})
    engine.setup()

    def entered(frames):
        return [e["track_id"] for i, t in enumerate(frames)
                for e in engine.ruleset.evaluate("cam", i, i / FPS, t, W, H) if e["event"] == "enter"]

    assert entered(PLATES) == [1, 2, 3, 4]
    rules = [{"id": "z", "kind": "zone", "polygon": ZONE_N, "attributes": {"text": {"regex": "^沪"}}}]
    engine.on_command("set_rules", {"stream": "cam", "rules": rules})
    assert engine.on_command("rules", {"stream": "cam"}) == rules
    assert entered(PLATES) == [2]
    with pytest.raises(ParamError, match=r"^rules\[0\]\.attributes\.text\.regex: not a valid regular expression"):
        engine.on_command("set_rules", {"stream": "cam", "rules": [{**rules[0], "attributes": {"text": {"regex": "("}}}]})
    assert engine.on_command("rules", {"stream": "cam"}) == rules  # a refused change leaves the rules as they were


def test_rule_filters_on_what_a_real_second_stage_attached():
    """Painted red and blue objects moving across a zone → track → secondary (a real ONNX colour classifier on the
    crops) → rule counting only the red ones."""
    from pathlib import Path

    from graphflow.engines.secondary import Secondary
    from graphflow.engines.track import Track
    from onnx_models import colour_classifier

    tmp = Path(pytest.importorskip("tempfile").mkdtemp())
    (tmp / "colours.txt").write_text("red\ngreen\nblue\n")
    classifier = {"model": str(colour_classifier(tmp / "colour.onnx")), "labels": str(tmp / "colours.txt"),
                  "size": [16, 16], "normalize": "none", "color": "rgb", "padding": 0.0}
    msgs = []
    for f in range(30):
        image = np.full((240, 400, 3), 90, np.uint8)
        dets = []
        for y, bgr in ((40, (40, 40, 220)), (140, (230, 60, 30))):  # BGR: a red object above a blue one
            x = 20 + 8 * f
            image[y:y + 60, x:x + 40] = bgr
            dets.append({"box": [float(x), float(y), float(x + 40), float(y + 60)], "score": 0.9, "class_id": 2,
                         "label": "car"})
        msgs.append(Message("cam", f, pts=f / FPS, data={"width": 400, "height": 240, "detections": dets},
                            arrays={"image": image}))
    tracked = run_engine(Track, {"min_hits": 1}, msgs)["out"]
    read = run_engine(Secondary, classifier, tracked)["out"]
    colours = {t["attributes"]["label"] for m in read for t in m.data["tracks"]}
    assert colours == {"red", "blue"}
    zone = [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]
    rules = [{"id": "red", "kind": "zone", "polygon": zone, "attributes": {"label": "red", "score": {"min": 0.5}}},
             {"id": "any", "kind": "zone", "polygon": zone}]
    out = run_engine(Rule, {"rules": rules}, read)["out"]
    events = [e for m in out for e in m.data["events"] if e["event"] == "enter"]
    assert sorted(e["rule"] for e in events) == ["any", "any", "red"]
    red = next(e for e in events if e["rule"] == "red")
    assert red["attributes"]["label"] == "red" and red["position"][1] == 100.0  # the upper (red) object's feet
