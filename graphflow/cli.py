"""`graphflow launch|validate|inspect|engines|bench`: the command line users start from."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__
from . import graph as graph_mod
from . import modeltools, registry, runtime, service
from .errors import GraphflowError
from .fields import declared, find, is_path
from .inspect import order, render
from .policy import Policy

OUTCOMES = {0: "clean", 1: "FAILED", 3: "finished with errors or losses"}  # Summary.exit_code → first summary line
SHOWN_ERRORS = 5  # error lines in the end-of-run summary; all of them go to --stats FILE


def _sources(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A source engine's per-stream metrics (`metrics["sources"]`), {} for engines that have none."""
    sources = s.get("metrics", {}).get("sources")
    return sources if isinstance(sources, dict) else {}


def _events(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Event counts per stream, merged over engines reporting `metrics["events"]` as {stream: {event: count}}."""
    out: dict[str, dict[str, int]] = {}
    for s in stats.values():
        events = s.get("metrics", {}).get("events")
        if not isinstance(events, dict):
            continue
        for stream, counts in events.items():
            if isinstance(counts, dict):
                mine = out.setdefault(str(stream), {})
                for name, n in counts.items():
                    if isinstance(n, int):
                        mine[name] = mine.get(name, 0) + n
    return out


def _busy_ms(s: dict[str, Any]) -> str:
    """Busy milliseconds per message, "-" before the first message (no division by a made-up count)."""
    n = s.get("received", 0)
    return f"{1000 * s.get('busy_s', 0.0) / n:.2f}" if n else "-"


def _progress_table(stats: dict[str, dict[str, Any]], wall: float, engines: list[str]) -> Any:
    """The live table: one row per engine, and under each source one row per stream with its state."""
    from rich.table import Table

    table = Table(title=f"graphflow — {wall:5.1f}s", title_justify="left")
    for col in ("engine", "state", "in", "out", "msg/s", "busy ms/msg", "queue", "drops", "errors"):
        table.add_column(col, justify="left" if col in ("engine", "state") else "right")
    for name in engines:
        s = stats.get(name)
        if s is None:
            continue
        received = s.get("received", 0)
        table.add_row(name, s.get("state", "?"), str(received), str(s.get("sent", 0)),
                      f"{received / max(wall, 1e-9):.1f}", _busy_ms(s), str(s.get("depth", 0)),
                      str(s.get("dropped", 0)), str(s.get("errors", 0)))
        streams = s.get("streams", {})
        for stream, src in _sources(s).items():
            frames = streams.get(stream, 0)
            table.add_row(f"  {stream}", str(src.get("state", "?")), "", str(frames),
                          f"{frames / max(wall, 1e-9):.1f}", "", "", "", "")
    return table


def _outcome(summary: runtime.Summary) -> str:
    """How the run ended and what its exit code says, for the summary's first line."""
    code = summary.exit_code
    errors, lost = sum(summary.errors_by_engine.values()), summary.lost
    detail = ", ".join(x for x in (f"{errors} error{'s' * (errors != 1)}" if errors else "",
                                   f"{lost} message{'s' * (lost != 1)} lost" if lost else "") if x)
    if code == 1:
        word = f"FAILED ({detail})" if detail else "FAILED"
    else:  # the text says what was counted even where the exit code does not
        word = f"finished with {detail}" if detail else OUTCOMES.get(code, f"exit {code}")
    how = f"stopped by {summary.stopped_by}" if summary.stopped_by else "all sources finished"
    return f"graphflow: {word} — exit {code}; {how} after {summary.wall_s:.1f}s"


def _rows(header: tuple[str, ...], rows: list[tuple[Any, ...]], indent: str = "  ") -> list[str]:
    """A small text table: first column left-aligned, the rest right-aligned, widths from the content."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


def _summary_lines(summary: runtime.Summary, graph: graph_mod.Graph, stats_file: str | None = None) -> list[str]:
    """End-of-run summary for people: outcome, per-stream frames and events, a short per-engine table, errors.
    Every figure is read with a default: an engine that died before its first report has a partial dict."""
    stats, wall = summary.stats, max(summary.wall_s, 1e-9)
    lines = [_outcome(summary)]
    sources = [n for n in graph.sources() if n in stats]
    sinks = [n.id for n in graph.nodes.values() if not n.cls.outputs and n.id in stats]
    events = _events(stats)
    streams: dict[str, list[Any]] = {}
    for name in sources:
        per = _sources(stats[name])
        for stream, frames in sorted(stats[name].get("streams", {}).items()):
            src = per.get(stream, {})
            delivered = max((stats[k].get("streams", {}).get(stream, 0) for k in sinks), default="-")
            streams[stream] = [stream, frames, f"{frames / wall:.1f}", delivered, src.get("state", "-")]
    if streams:
        lines.append("streams:")
        lines += _rows(("stream", "frames", "fps", "at sinks", "state", "events"),
                       [(*row, ", ".join(f"{k}={v}" for k, v in sorted(events.get(stream, {}).items())) or "-")
                        for stream, row in streams.items()])
    lines.append("engines:")
    rows = []
    for name in order(graph):
        s = stats.get(name)
        if s is None:
            rows.append((name, "not started", "-", "-", "-", "-", "-", "-", "-"))
            continue
        rows.append((name, s.get("state", "?"), s.get("received", 0), s.get("sent", 0),
                     f"{s.get('received', 0) / wall:.1f}", _busy_ms(s), s.get("dropped", 0), s.get("errors", 0),
                     s.get("lost", 0)))
    lines += _rows(("engine", "state", "in", "out", "msg/s", "busy ms/msg", "drops", "errors", "lost"), rows)
    if summary.lost:
        lines.append(f"lost: {summary.lost} (" + "; ".join(f"{why} {n}" for why, n in summary.lost_reasons.items()) + ")")
    if summary.errors:
        lines.append(f"errors ({len(summary.errors)}, last {min(len(summary.errors), SHOWN_ERRORS)}):")
        lines += [f"  {_one_line(e)}" for e in summary.errors[-SHOWN_ERRORS:]]
    lines.append(f"details: {stats_file}" if stats_file else "details: --stats FILE (JSON: every counter and metric)")
    return lines


def _one_line(text: str) -> str:
    """An error report as one line: its first line, and the exception (last line) when a traceback follows."""
    parts = [p for p in str(text).splitlines() if p.strip()]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return f"{parts[0]} {parts[-1].strip()}"


def _stats_document(summary: runtime.Summary, graph: graph_mod.Graph) -> dict[str, Any]:
    """Everything the run reported, for --stats FILE: every Summary field, the exit code and its meaning."""
    doc: dict[str, Any] = {"graph": graph.name, "file": graph.file, "exit_code": summary.exit_code,
                           "outcome": OUTCOMES.get(summary.exit_code, "")}
    doc.update({f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)})
    doc["engines"] = doc.pop("stats")
    return doc


def _live_logging(console: Any) -> list[logging.Handler]:
    """Send log records through the live display's console, so they print above the table instead of tearing
    it; returns the handlers it replaced."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    previous = root.handlers[:]
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.handlers = [handler]
    return previous


def cmd_launch(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    if args.stats and not Path(args.stats).resolve().parent.is_dir():
        print(f"error: --stats {args.stats}: directory does not exist", file=sys.stderr)
        return 2
    live = None
    previous: list[logging.Handler] = []
    t0 = time.monotonic()
    if sys.stderr.isatty() and not args.quiet:
        from rich.console import Console
        from rich.live import Live

        console = Console(stderr=True)
        live = Live(console=console, refresh_per_second=4, transient=False)
        previous = _live_logging(console)
        live.start()
    engines = order(g)
    try:
        summary = runtime.run(g, (lambda st: live.update(_progress_table(st, time.monotonic() - t0, engines)))
                              if live else None)
        if live is not None:  # the table left on screen shows the final counts
            live.update(_progress_table(summary.stats, summary.wall_s, engines))
    finally:
        if live is not None:
            live.stop()
            logging.getLogger().handlers = previous
    for line in _summary_lines(summary, g, args.stats):
        print(line, file=sys.stderr)
    if args.stats:
        Path(args.stats).write_text(json.dumps(_stats_document(summary, g), indent=1, default=str))
    return summary.exit_code


def _policy(args: argparse.Namespace, path: str) -> Policy | None:
    """The restricted-mode policy `validate --restricted` checks a graph against (None without the flag): media
    under --media-root (default: the graph's folder), outputs under --output-root, modules from --allow-module."""
    if not args.restricted:
        return None
    return Policy(output_root=args.output_root, media_roots=tuple(args.media_root or [Path(path).parent]),
                  modules=tuple(args.allow_module))


def cmd_validate(args: argparse.Namespace) -> int:
    code = 0
    for path in args.graph:
        try:
            g = graph_mod.load(path, graph_mod.parse_set(args.set), policy=_policy(args, path))
            mode = " in restricted mode" if args.restricted else ""
            print(f"{path}: ok{mode} ({len(g.nodes)} engines, {len(g.edges)} connections)")
        except GraphflowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
    return code


def cmd_inspect(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    out = render(g, args.format, args.output)
    if out is not None:
        print(out)
    else:
        print(f"wrote {args.output}")
    return 0


def _doc(obj: Any) -> str:
    """The first paragraph of a docstring as one line (docstrings wrap mid-sentence)."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


def _sink_kinds() -> dict[str, list[str]]:
    """Each sink kind of `publish` with its keys described, from the sinks' own declarations."""
    from graphflow.engines.publish import sink_kinds

    return {kind: _described(keys) for kind, keys in sink_kinds().items()}


def _described(params: dict[str, Any], prefix: str = "") -> list[str]:
    """One `name: description` line per declared key, for `graphflow engines`."""
    return [f"{prefix}{k}: {p.describe()}" for k, p in params.items()]


def _rule_kinds() -> dict[str, list[str]]:
    """The keys every rule takes with the tests of its `attributes` filter, then each rule kind of `rule` with what
    it does and its own keys, described from the rules' declarations."""
    from graphflow.vision.rules import ATTRIBUTE_TEST, COMMON, RULE_CLASSES

    every = _described(COMMON) + _described(ATTRIBUTE_TEST, "attributes.NAME.")
    return {"every kind": every, **{kind: [_doc(cls), *_described(cls.params)] for kind, cls in RULE_CLASSES.items()}}


KINDS: dict[str, tuple[str, Callable[[], dict[str, list[str]]]]] = {
    "publish": ("sink kinds (sinks[i].kind)", _sink_kinds),
    "rule": ("rule kinds (rules[i].kind)", _rule_kinds),
}


def cmd_engines(args: argparse.Namespace) -> int:
    width = max(shutil.get_terminal_size().columns, 60)

    def say(text: str, indent: str, hang: str = "") -> None:
        print(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + hang,
                            break_long_words=False, break_on_hyphens=False))
    for name in registry.available():
        try:
            cls = registry.resolve(name)
        except ValueError as exc:
            print(f"{name}: unavailable ({exc})")
            continue
        say(f"{name}  — {_doc(cls)}", "", "    ")
        print(f"    inputs: {', '.join(cls.inputs) or '-'}   outputs: {', '.join(cls.outputs) or '-'}")
        for pname, p in cls.declared_params().items():
            say(f"{pname}: {p.describe()}", "    ", "    ")
        if name in KINDS:
            title, kinds = KINDS[name]
            print(f"    {title}:")
            for kind, lines in kinds().items():
                print(f"      {kind}")
                for line in lines:
                    say(line, "        ", "  ")
    return 0


def _redirect_outputs(g: graph_mod.Graph, folder: Path) -> list[tuple[str, str]]:
    """Point every file an engine declares it writes (`path="write"` params and `path_fields`, e.g. publish's
    `sinks[].path`) into `folder`, so a bench leaves the user's files alone; returns (was, now) pairs."""
    moved: list[tuple[str, str]] = []
    taken: set[str] = set()
    for node in g.nodes.values():
        for spec in declared(node.cls):
            if spec.kind != "write":
                continue
            for found in list(find(node.params, spec)):
                if not is_path(found.value, spec):
                    continue
                name = Path(found.value).name
                while name in taken:
                    name = f"_{name}"
                taken.add(name)
                moved.append((found.value, str(folder / name)))
                found.holder[found.key] = moved[-1][1]
    return moved


def cmd_bench(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    folder = Path(args.outputs) if args.outputs else Path(tempfile.mkdtemp(prefix="graphflow-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    moved = _redirect_outputs(g, folder.resolve())
    if moved:
        where = f"into {folder}" if args.outputs else "into a temporary folder, removed after the run (--outputs DIR keeps them)"
        print(f"bench: sink outputs go {where}; your files are left alone: "
              + ", ".join(Path(was).name for was, _ in moved), file=sys.stderr)
    try:
        summary = runtime.run(g)
    finally:
        if not args.outputs:
            shutil.rmtree(folder, ignore_errors=True)
    wall = max(summary.wall_s, 1e-9)
    busy = {name: s.get("busy_s", 0.0) for name, s in summary.stats.items()}
    top = max(busy, key=lambda k: busy[k], default="")
    print(f"{'engine':<12} {'msgs':>7} {'msg/s':>9} {'busy ms/msg':>12} {'busy/wall':>10} {'share':>6}")
    for name, s in summary.stats.items():
        n = s.get("received", 0)
        mark = "  ← bottleneck" if name == top and len(busy) > 1 else ""
        print(f"{name:<12} {n:>7} {n / wall:>9.1f} {_busy_ms(s):>12} {busy[name] / wall:>10.0%}"
              f" {busy[name] / max(sum(busy.values()), 1e-9):>6.1%}{mark}")
    print(f"{_outcome(summary)}")
    result = {"graph": g.name, "wall_s": round(summary.wall_s, 3), "exit_code": summary.exit_code, "bottleneck": top,
              "engines": {k: {"msgs": s.get("received", 0), "busy_s": round(s.get("busy_s", 0.0), 4)}
                          for k, s in summary.stats.items()}}
    print("RESULT " + json.dumps(result))
    return summary.exit_code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; `-v` is accepted before or after the subcommand."""
    parser = argparse.ArgumentParser(prog="graphflow", description="Multi-stream video analytics graphs.",
                                     epilog="exit codes: 0 clean; 1 failed; 2 usage or graph file error; "
                                            "3 finished, but engines reported errors or messages were lost")
    parser.add_argument("--version", action="version", version=f"graphflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too; SUPPRESS keeps an earlier -v
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def with_graph(name: str, help_: str, many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, parents=[common])
        p.add_argument("graph", nargs="+" if many else None, help="graph JSON file")
        p.add_argument("--set", action="append", default=[], metavar="ENGINE.PARAM=VALUE", help="override a param")
        return p

    p = with_graph("launch", "run a graph until its sources end or SIGINT/SIGTERM")
    p.add_argument("--stats", metavar="FILE", help="write every counter and metric of the run as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    p.set_defaults(fn=cmd_launch)
    p = with_graph("validate", "check graph files without running them (nor running any engine's setup)", many=True)
    p.add_argument("--restricted", action="store_true",
                   help="check as an untrusted graph (as the service does): only built-in engines and allowed modules, "
                        "media under --media-root, outputs under --output-root and not over existing files, "
                        "loopback binds, file/rtsp URIs")
    p.add_argument("--media-root", action="append", default=[], metavar="DIR",
                   help="with --restricted: a folder media may be read from (default: the graph's folder)")
    p.add_argument("--output-root", default=".", metavar="DIR",
                   help="with --restricted: the folder outputs must stay in (default: the current folder)")
    p.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                   help="with --restricted: a package or module whose engines and functions may be used")
    p.set_defaults(fn=cmd_validate)
    p = with_graph("inspect", "show a graph as text, DOT or PNG")
    p.add_argument("--format", choices=("text", "dot", "png"), default="text")
    p.add_argument("-o", "--output", help="output file (required for png)")
    p.set_defaults(fn=cmd_inspect)
    sub.add_parser("engines", help="list engine types, their ports and params",
                   parents=[common]).set_defaults(fn=cmd_engines)
    p = with_graph("bench", "run a graph and print per-engine throughput; sink outputs go to a temporary folder")
    p.add_argument("--outputs", metavar="DIR", help="write the sinks' outputs into DIR (kept) instead")
    p.set_defaults(fn=cmd_bench)
    modeltools.add_subcommand(sub)  # `graphflow model inspect|quantize`
    service.add_subcommands(sub)  # `graphflow serve`, `graphflow streams add|rm|ls`
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (0 clean, 1 failed, 2 usage or graph error, 3 errors or losses)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except GraphflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that quit early (`| head`): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
