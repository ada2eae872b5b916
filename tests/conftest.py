import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_graph(tmp_path):
    """Write a graph document to tmp_path/name and return its path."""
    def write(doc, name="graph.json"):
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=1))
        return path
    return write


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Create an importable user module in tmp_path from source text."""
    def make(name, source):
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        return name
    return make
