"""The `graphflow` command line."""
from graphflow.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
