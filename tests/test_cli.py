"""CLI: launch summary and exit codes, the live table, bench, validate (restricted), inspect, engines, --version, tools."""
import inspect
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import graphflow
import graphflow.graph.render
from graphflow import Engine, Message
from graphflow import cli
from graphflow.cli import launch
from graphflow import runtime
from graphflow import graph as graph_mod

ROOT = Path(__file__).resolve().parents[1]


def gf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphflow", *args], capture_output=True, text=True, cwd=cwd)


def test_inspect_text_dot_png(tmp_path):
    demo = str(ROOT / "graphs/demo.json")
    text = gf("inspect", demo)
    assert text.returncode == 0, text.stderr
    assert "det [infer, thread]" in text.stdout and "out ──block/8──> trk.in" in text.stdout
    dot = gf("inspect", demo, "--format", "dot")
    assert dot.stdout.startswith('digraph "demo"') and '"src" -> "pre"' in dot.stdout
    shards = gf("inspect", str(ROOT / "graphs/shards.json"), "--format", "dot").stdout
    assert 'subgraph cluster_0 { label="process:a";' in shards and '"src_a" -> "det_a" [label="out→in' in shards
    assert shards.index('label="process:b"') < shards.index('"det_b" [label=') < shards.index('"src_a" -> "det_a"')
    png = tmp_path / "g.png"
    assert gf("inspect", demo, "--format", "png", "-o", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    default = gf("inspect", demo, "--format", "png", cwd=tmp_path)  # without -o: demo.png in the current folder
    assert default.returncode == 0 and default.stdout.strip() == "wrote demo.png", default.stderr
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_of_a_chain_is_laid_out_in_rows_with_readable_text(tmp_path):
    """The demo's 6-engine chain wraps into rows (today's single strip was 2309x211 with 8-point text)."""
    from PIL import Image

    png = tmp_path / "demo.png"
    assert gf("inspect", str(ROOT / "graphs/demo.json"), "--format", "png", "-o", str(png)).returncode == 0
    width, height = Image.open(png).size
    assert 1.2 <= width / height <= 3.0 and width <= 1400, (width, height)
    fig = graphflow.graph.render.figure(graph_mod.load(ROOT / "graphs/demo.json"))
    boxes = [t for t in fig.axes[0].texts if t.get_bbox_patch() is not None]
    assert len({round(t.get_position()[1], 3) for t in boxes}) == 2  # two rows of three
    assert min(t.get_fontsize() for t in boxes) >= 10


def test_engines_name_shows_that_engine_only_and_a_typo_is_one_line(tmp_path):
    one = gf("engines", "track")
    assert one.returncode == 0 and one.stdout.startswith("track  — ")
    assert "decode" not in one.stdout.split("\n")[0] and "infer  —" not in one.stdout
    (tmp_path / "mine.py").write_text("from graphflow import Engine\n\nclass Tally(Engine):\n"
                                      "    \"\"\"Counts.\"\"\"\n    inputs = ('in',)\n")
    user = gf("engines", "mine:Tally", cwd=tmp_path)
    assert user.returncode == 0 and user.stdout.startswith("mine:Tally  — Counts."), user.stderr
    typo = gf("engines", "tracker")
    assert typo.returncode == 2 and typo.stdout == ""
    assert typo.stderr.startswith("error: engines: unknown engine type 'tracker' (did you mean 'track'?")
    assert typo.stderr.count("\n") == 1


def test_engines_lists_builtins_with_params():
    out = gf("engines")
    assert out.returncode == 0
    for name in ("source", "map", "sink", "decode", "preprocess", "infer", "track", "rule"):
        assert f"\n{name}  — " in "\n" + out.stdout
    assert "count: int (default 100, ≥ 0)" in out.stdout


def test_launch_writes_outputs_beside_the_graph_from_any_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "counter.json").write_text((ROOT / "graphs/counter.json").read_text())
    out = gf("launch", "-q", "../counter.json", "--set", "src.count=20", cwd=tmp_path / "elsewhere")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "counter.jsonl").read_text().splitlines()]
    assert sorted(r["value"] for r in rows if r["stream"] == "s1") == [2 * i for i in range(20)]
    assert out.stderr.startswith("graphflow: clean — exit 0; all sources finished")


def fail_on_odd(msg: Message) -> Message:
    """A user's map function that fails on every odd value (the run goes on: on_error skip)."""
    if msg.data["value"] % 2:
        raise ValueError(f"odd value {msg.data['value']}")
    return msg


class Tally(Engine):
    """Passes messages on and counts them as `tick` events per stream, as an event-producing engine reports them."""

    def setup(self) -> None:
        self.ticks: dict[str, int] = {}

    def process(self, msg: Message) -> None:
        self.ticks[msg.stream] = self.ticks.get(msg.stream, 0) + 1
        self.send(msg)

    def metrics(self) -> dict:
        return {"events": {stream: {"tick": n} for stream, n in getattr(self, "ticks", {}).items()}}


class Chatty(Engine):
    """Passes messages on and logs one warning halfway through a run."""

    def process(self, msg: Message) -> None:
        if msg.seq == 10:
            self.log.warning("halfway there on stream %s", msg.stream)
        self.send(msg)


def terminal_screen(raw: bytes) -> list[str]:
    """The lines a terminal shows after `raw`: the part of VT100 a live display uses (CR, LF, cursor up, erase
    line); colours and cursor visibility are ignored."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", raw.decode(errors="replace")):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            lines += [[] for _ in range(row + 1 - len(lines))]
        elif token.startswith("\x1b["):
            arg = token[2:-1]
            if token[-1] == "A":
                row = max(row - int(arg or 1), 0)
            elif token[-1] == "K":
                lines[row] = [] if arg == "2" else lines[row][:col]
        else:
            line = lines[row]
            line += [" "] * (col + 1 - len(line))
            line[col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


def counter_doc(tmp_path, **map_params):
    return {"name": "t", "engines": {
        "src": {"type": "source", "params": {"count": 10}},
        "f": {"type": "map", "params": {"function": "graphflow.examples:identity", **map_params}},
        "out": {"type": "sink", "params": {"path": str(tmp_path / "out.jsonl")}}},
        "connections": [["src.out", "f.in"], ["f.out", "out.in"]]}


def test_version_and_verbose_before_or_after_the_subcommand():
    out = gf("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"graphflow {graphflow.__version__}"
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "validate", "g.json"]).verbose
    assert parser.parse_args(["validate", "g.json", "-v"]).verbose
    assert parser.parse_args(["engines", "--verbose"]).verbose
    assert not parser.parse_args(["validate", "g.json"]).verbose


def test_engines_prints_whole_descriptions_sink_and_rule_kinds():
    from graphflow.engines.publish import sink_kinds
    from graphflow.engines.rule import Rule
    from graphflow.vision.rules import ATTRIBUTE_TEST, COMMON, RULE_CLASSES

    out = gf("engines")
    assert out.returncode == 0, out.stderr
    flat = " ".join(out.stdout.split())
    assert " ".join(inspect.getdoc(Rule).split("\n\n")[0].split()) in flat  # not cut at the docstring's line end
    sinks = flat[flat.index("sink kinds"):flat.index("rule —")]
    for kind, keys in sink_kinds().items():
        assert f" {kind} " in sinks and all(f" {key}: {p.describe()}" in sinks for key, p in keys.items())
    rules = flat[flat.index("rule kinds"):]
    every = ["every kind", *described(COMMON), *described(ATTRIBUTE_TEST, "attributes.NAME.")]
    assert " ".join(every) in rules  # the keys every rule takes and the attribute tests, listed once
    assert all(rules.count(line) == 1 for line in every[1:])
    for kind, cls in RULE_CLASSES.items():  # then each kind: what it does, and its own keys
        assert " ".join([kind, " ".join(inspect.getdoc(cls).split("\n\n")[0].split()), *described(cls.params)]) in rules
    assert "line_cross Line crossing:" in rules and " line: a list of [x, y] points (required) — " in rules


def described(params: dict, prefix: str = "") -> list[str]:
    return [f"{prefix}{key}: {p.describe()}" for key, p in params.items()]


def test_tools_print_help_instead_of_running(tmp_path):
    for tool in sorted((ROOT / "tools").glob("*.py")):
        out = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (tool.name, out.stderr)
        assert list(tmp_path.iterdir()) == [], tool.name  # nothing written, nothing run


def test_png_labels_fit_and_boxes_do_not_overlap(write_graph):
    doc = json.loads((ROOT / "graphs/shards.json").read_text())
    for src in ("src_a", "src_b"):
        for source in doc["engines"][src]["params"]["sources"]:
            source["uri"] = str(ROOT / "graphs/data/demo.mp4")
    doc["engines"]["a_rather_long_engine_name_for_the_tracker"] = doc["engines"].pop("trk_a")
    doc["connections"] = [[end.replace("trk_a.", "a_rather_long_engine_name_for_the_tracker.") for end in c]
                          for c in doc["connections"]]
    g = graph_mod.load(write_graph(doc))
    fig = graphflow.graph.render.figure(g)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    labels = [t for t in fig.axes[0].texts if t.get_bbox_patch() is not None]
    assert sorted(t.get_text().split("\n")[0] for t in labels) == sorted(g.nodes)
    page = fig.bbox
    boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in labels]
    for text, box in zip(labels, boxes):
        inner = text.get_window_extent(renderer)
        assert box.x0 <= inner.x0 and inner.x1 <= box.x1 and box.y0 <= inner.y0 and inner.y1 <= box.y1
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)


def test_summary_of_a_run_with_errors_says_so_and_exits_3(tmp_path, write_graph):
    path = write_graph(counter_doc(tmp_path, function="tests.test_cli:fail_on_odd"))
    out = gf("launch", "-q", str(path), "--stats", str(tmp_path / "stats.json"), cwd=ROOT)
    assert out.returncode == 3, out.stderr
    first = next(line for line in out.stderr.splitlines() if line.startswith("graphflow: "))  # after the error logs
    assert first.startswith("graphflow: finished with 5 errors — exit 3;"), first
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["exit_code"] == 3 and stats["engines"]["f"]["errors"] == 5
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_summary_puts_streams_first_and_survives_partial_stats(tmp_path, write_graph):
    g = graph_mod.load(write_graph(counter_doc(tmp_path)))
    died = runtime.Summary(stats={"src": {"engine": "src", "received": 10, "sent": 10, "streams": {"s0": 10}},
                                  "f": {"engine": "f", "state": "died"}},
                           errors=["engine 'f' (process 123) died: killed by SIGKILL"], wall_s=2.0, failed=True)
    lines = launch.summary_lines(died, g)
    assert lines[0] == "graphflow: FAILED — exit 1; all sources finished after 2.0s"
    assert lines[1] == "streams:" and lines[3].split() == ["s0", "10", "5.0", "-", "-", "-"]
    table = lines[lines.index("engines:") + 1:]
    assert table[1].split()[:2] == ["src", "?"] and table[2].split() == ["f", "died", "0", "0", "0.0", "-", "0", "0", "0"]
    assert table[3].split()[:2] == ["out", "not"]
    assert lines[-2].strip() == "engine 'f' (process 123) died: killed by SIGKILL"


def test_live_table_shows_source_states_and_no_busy_time_without_messages():
    from rich.console import Console

    stats = {"src": {"engine": "src", "state": "running", "received": 0, "sent": 0, "busy_s": 11.0,
                     "metrics": {"sources": {"cam1": {"state": "reconnecting"}, "cam2": {"state": "connecting"}}}}}
    console = Console(record=True, width=120)
    console.print(launch.progress_table(stats, 30.0, ["src"]))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.count("│") > 3}
    assert rows["src"][:5] == ["running", "0", "0", "0.0", "-"]
    assert rows["cam1"][0] == "reconnecting" and rows["cam2"][0] == "connecting"


def test_bench_leaves_the_users_outputs_alone(tmp_path, write_graph):
    doc = counter_doc(tmp_path)
    doc["engines"]["out"] = {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": "counter.jsonl"}]}}
    write_graph(doc, "counter.json")
    (tmp_path / "counter.jsonl").write_text("the user's results\n")
    out = gf("bench", "counter.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "counter.jsonl").read_text() == "the user's results\n"
    assert "sink outputs go into a temporary folder" in out.stderr
    result = json.loads(out.stdout.splitlines()[-1].removeprefix("RESULT "))
    busiest = max(result["engines"], key=lambda k: result["engines"][k]["busy_s"])
    assert result["bottleneck"] == busiest
    assert [line.split()[0] for line in out.stdout.splitlines() if line.endswith("← bottleneck")] == [busiest]
    kept = gf("bench", "counter.json", "--outputs", "bench-out", cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert len((tmp_path / "bench-out/counter.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "counter.jsonl").read_text() == "the user's results\n"


def test_summary_counts_events_per_stream(tmp_path, write_graph, capsys):
    doc = counter_doc(tmp_path)
    doc["engines"]["src"]["params"]["streams"] = 2
    doc["engines"]["f"] = {"type": "tests.test_cli:Tally"}
    assert cli.main(["launch", "-q", str(write_graph(doc))]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("graphflow: clean — exit 0; all sources finished after")
    assert lines[1] == "streams:" and lines[2].split() == ["stream", "frames", "fps", "at", "sinks", "state", "events"]
    assert [(row.split()[0], row.split()[1], row.split()[-1]) for row in lines[3:5]] == [("s0", "10", "tick=10"),
                                                                                       ("s1", "10", "tick=10")]


def test_live_table_on_a_terminal_is_not_torn_by_log_lines(tmp_path, write_graph):
    doc = counter_doc(tmp_path)
    doc["engines"]["src"]["params"].update(count=30, rate=20)
    doc["engines"]["f"] = {"type": "tests.test_cli:Chatty"}
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", str(write_graph(doc))], cwd=ROOT, env=env,
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        raw += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, raw.decode(errors="replace")
    screen = terminal_screen(raw)
    warning = [line for line in screen if "halfway there" in line]
    assert warning == ["WARNING  graphflow.engine.f: halfway there on stream s0"], screen
    table = [line for line in screen if line.startswith("│ ")]
    assert [line.split()[1] for line in table] == ["src", "f", "out"], screen
    assert screen.index(warning[0]) < screen.index(table[0])  # printed above the live table
    assert any(line.startswith("graphflow: clean — exit 0") for line in screen)


def test_validate_restricted_checks_the_graph_as_untrusted(tmp_path):
    (tmp_path / "out").mkdir()
    demo, counter = str(ROOT / "graphs/demo.json"), str(ROOT / "graphs/counter.json")
    ok = gf("validate", "--restricted", demo, "--output-root", "out", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout == f"{demo}: ok in restricted mode (6 engines, 5 connections)\n", ok.stderr
    (tmp_path / "out/demo.jsonl").write_text("earlier results\n")
    refused = gf("validate", "--restricted", demo, counter, "--output-root", "out", cwd=tmp_path)
    assert refused.returncode == 2
    first, second = refused.stderr.splitlines()  # one line per graph, naming file, engine and field
    assert first.startswith(f"error: {demo}: engines.out.params.sinks[0].path: ") and " exists" in first
    assert second.startswith(f"error: {counter}: engines.double.type: ") and "not allowed" in second
    assert gf("validate", counter).returncode == 0  # a graph of the user's own: unrestricted


def test_live_table_shows_a_files_share_and_eta():
    from rich.console import Console

    per = {"file": {"state": "running", "expected": 100}, "cam": {"state": "running", "expected": None},
           "done": {"state": "ended", "expected": 40}}
    stats = {"src": {"engine": "src", "state": "running", "received": 0, "sent": 90,
                     "streams": {"file": 25, "cam": 25, "done": 40}, "metrics": {"sources": per}}}
    console = Console(record=True, width=140)
    console.print(launch.progress_table(stats, 10.0, ["src"]))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.count("│") > 3}
    assert rows["file"][0] == "running 25% ETA 0:30"  # 75 frames left at 2.5 frames/s
    assert rows["cam"][0] == "running" and rows["done"][0] == "ended 100%"
