"""`graphflow launch|validate|inspect|engines|bench`: the command line users start from."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from . import graph as graph_mod
from . import registry, runtime
from .errors import GraphflowError
from .inspect import render

log = logging.getLogger("graphflow")


def _progress_table(stats: dict[str, dict[str, Any]], wall: float, order: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=f"graphflow — {wall:5.1f}s", title_justify="left")
    for col in ("engine", "state", "in", "out", "msg/s", "busy ms/msg", "queue", "drops", "errors"):
        table.add_column(col, justify="left" if col in ("engine", "state") else "right")
    for name in order:
        if name not in stats:
            continue
        s = stats[name]
        n = max(s["received"], 1)
        table.add_row(name, s["state"], str(s["received"]), str(s["sent"]), f"{s['received'] / max(wall, 1e-9):.1f}",
                      f"{1000 * s['busy_s'] / n:.2f}", str(s["depth"]), str(s["dropped"]), str(s["errors"]))
    return table


def _summary_lines(summary: runtime.Summary) -> list[str]:
    how = ("stopped by " + summary.stopped_by if summary.stopped_by
           else "finished with failures" if summary.failed else "all sources finished")
    lines = [f"graphflow: {how} after {summary.wall_s:.1f}s"]
    for name, s in summary.stats.items():
        per_stream = ", ".join(f"{k}={v}" for k, v in sorted(s["streams"].items()))
        lines.append(f"  {name:<12} in={s['received']:<6} out={s['sent']:<6} drops={s['dropped']:<4} "
                     f"errors={s['errors']:<3} busy={s['busy_s']:.2f}s  {per_stream}")
        for key, value in s.get("metrics", {}).items():
            if not isinstance(value, (list, dict)):  # timelines and tables go to --stats FILE
                lines.append(f"  {'':<12} {key}={value}")
    return lines


def cmd_launch(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    live = None
    t0 = time.monotonic()
    if sys.stderr.isatty() and not args.quiet:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
        live.start()
    try:
        summary = runtime.run(g, (lambda st: live.update(_progress_table(st, time.monotonic() - t0, list(g.nodes)))) if live else None)
    finally:
        if live is not None:
            live.stop()
    for line in _summary_lines(summary):
        print(line, file=sys.stderr)
    if args.stats:
        Path(args.stats).write_text(json.dumps({"graph": g.name, "wall_s": summary.wall_s, "engines": summary.stats,
                                                "errors": summary.errors}, indent=1))
    return summary.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    code = 0
    for path in args.graph:
        try:
            g = graph_mod.load(path, graph_mod.parse_set(args.set))
            print(f"{path}: ok ({len(g.nodes)} engines, {len(g.edges)} connections)")
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


def cmd_engines(args: argparse.Namespace) -> int:
    for name in registry.available():
        try:
            cls = registry.resolve(name)
        except ValueError as exc:
            print(f"{name}: unavailable ({exc})")
            continue
        print(f"{name}  — {cls.summary()}")
        print(f"    inputs: {', '.join(cls.inputs) or '-'}   outputs: {', '.join(cls.outputs) or '-'}")
        for pname, p in cls.declared_params().items():
            print(f"    {pname}: {p.describe()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    summary = runtime.run(g)
    busy = sum(s["busy_s"] for s in summary.stats.values())
    print(f"{'engine':<12} {'msgs':>7} {'msg/s':>9} {'busy ms/msg':>12} {'share':>6}")
    for name, s in summary.stats.items():
        n = max(s["received"], 1)
        print(f"{name:<12} {s['received']:>7} {s['received'] / summary.wall_s:>9.1f} {1000 * s['busy_s'] / n:>12.3f}"
              f" {s['busy_s'] / max(busy, 1e-9):>6.1%}")
    result = {"graph": g.name, "wall_s": round(summary.wall_s, 3),
              "engines": {k: {"msgs": s["received"], "busy_s": round(s["busy_s"], 4)} for k, s in summary.stats.items()}}
    print("RESULT " + json.dumps(result))
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphflow", description="Multi-stream video analytics graphs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def with_graph(name: str, help_: str, many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("graph", nargs="+" if many else None, help="graph JSON file")
        p.add_argument("--set", action="append", default=[], metavar="ENGINE.PARAM=VALUE", help="override a param")
        return p

    p = with_graph("launch", "run a graph until its sources end or SIGINT/SIGTERM")
    p.add_argument("--stats", metavar="FILE", help="write final stats as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    p.set_defaults(fn=cmd_launch)
    with_graph("validate", "check graph files without running them", many=True).set_defaults(fn=cmd_validate)
    p = with_graph("inspect", "show a graph as text, DOT or PNG")
    p.add_argument("--format", choices=("text", "dot", "png"), default="text")
    p.add_argument("-o", "--output", help="output file (required for png)")
    p.set_defaults(fn=cmd_inspect)
    sub.add_parser("engines", help="list engine types, their ports and params").set_defaults(fn=cmd_engines)
    with_graph("bench", "run a graph and print per-engine throughput").set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except GraphflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
