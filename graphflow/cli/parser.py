"""The `graphflow` command line: one subcommand per job, user mistakes as one line and exit 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from graphflow import __version__
from graphflow.cli.graphs import cmd_engines, cmd_inspect, cmd_validate, print_error
from graphflow.cli.launch import cmd_bench, cmd_launch
from graphflow.cli.model import add_subcommand as add_model_commands
from graphflow.cli.serve import add_subcommands as add_service_commands
from graphflow.errors import GraphflowError


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
    p.add_argument("--allow-broker", action="append", default=[], metavar="HOST:PORT",
                   help="with --restricted: a Redis server sinks may send to, besides those on loopback")
    p.set_defaults(fn=cmd_validate)
    p = with_graph("inspect", "show a graph as text, DOT or PNG")
    p.add_argument("--format", choices=("text", "dot", "png"), default="text")
    p.add_argument("-o", "--output", help="output file (png: default GRAPH.png in the current folder)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("engines", help="list engine types, their ports and params", parents=[common])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these engines (built-in names or package.module:Class); default: every built-in")
    p.set_defaults(fn=cmd_engines)
    p = with_graph("bench", "run a graph and print per-engine throughput; sink outputs go to a temporary folder")
    p.add_argument("--outputs", metavar="DIR", help="write the sinks' outputs into DIR (kept) instead")
    p.set_defaults(fn=cmd_bench)
    add_model_commands(sub)  # `graphflow model inspect|quantize`
    add_service_commands(sub)  # `graphflow serve`, `graphflow streams add|rm|ls`
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (0 clean, 1 failed, 2 usage or graph error, 3 errors or losses)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except GraphflowError as exc:
        print_error(exc)
        return 2
    except BrokenPipeError:  # output piped into a reader that quit early (`| head`): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
