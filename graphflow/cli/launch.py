"""`graphflow launch` and `graphflow bench`: run a graph with live progress and a summary."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from graphflow import graph as graph_mod
from graphflow import runtime
from graphflow.graph.fields import declared, find, is_path
from graphflow.graph.render import order
from graphflow.runtime.summary import OUTCOMES

log = logging.getLogger(__name__)


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


def _share(frames: int, expected: Any, wall: float) -> str:
    """A stream's progress where its length is known (a file): "42% ETA 0:07" at the rate so far; "" otherwise."""
    if not isinstance(expected, int) or expected <= 0:
        return ""
    done = min(frames / expected, 1.0)
    if not frames or done >= 1.0:
        return f"{done:.0%}"
    left = round((expected - frames) * wall / frames)
    return f"{done:.0%} ETA {left // 60}:{left % 60:02d}"


def progress_table(stats: dict[str, dict[str, Any]], wall: float, engines: list[str]) -> Any:
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
            state = str(src.get("state", "?"))
            table.add_row(f"  {stream}", f"{state} {_share(frames, src.get('expected'), wall)}".strip(), "",
                          str(frames), f"{frames / max(wall, 1e-9):.1f}", "", "", "", "")
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


def summary_lines(summary: runtime.Summary, graph: graph_mod.Graph, stats_file: str | None = None) -> list[str]:
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
        counts = stats[name].get("streams", {})
        for stream in sorted(set(counts) | set(per)):  # a stream that failed before its first frame has no count
            frames, src = counts.get(stream, 0), per.get(stream, {})
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
        summary = runtime.run(g, (lambda st: live.update(progress_table(st, time.monotonic() - t0, engines)))
                              if live else None)
        if live is not None:  # the table left on screen shows the final counts
            live.update(progress_table(summary.stats, summary.wall_s, engines))
    finally:
        if live is not None:
            live.stop()
            logging.getLogger().handlers = previous
    for line in summary_lines(summary, g, args.stats):
        print(line, file=sys.stderr)
    if args.stats:
        Path(args.stats).write_text(json.dumps(summary.document(g), indent=1, default=str))
    return summary.exit_code


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
