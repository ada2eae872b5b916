"""A plain `pip install` (no extras) runs the demo: everything `graphflow launch graphs/demo.json` imports, in the
launcher and in its child processes, comes from graphflow's core dependencies or what those depend on."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def core_closure() -> set[str]:
    """pyproject's core dependencies and, through installed metadata, everything they require (extras left out)."""
    todo = [_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if not re.search(r"\bextra\s*==", r)]
    return seen


def imported(args: list[str], cwd: Path) -> set[str]:
    """Top-level modules a command imports (its child processes included: they inherit `-X importtime`)."""
    res = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line}


def test_the_demo_imports_only_core_dependencies(tmp_path):
    doc = json.loads((ROOT / "graphs" / "demo.json").read_text())
    source = doc["engines"]["src"]["params"]["sources"][0]
    source["max_frames"] = 3
    source["uri"] = str(ROOT / "graphs" / "data" / "demo.mp4")
    (tmp_path / "demo.json").write_text(json.dumps(doc))
    used = imported(["-m", "graphflow", "launch", "-q", "demo.json"], tmp_path)
    used -= imported(["-c", "pass"], tmp_path)  # what the interpreter and its site hooks load anyway
    assert {"graphflow", "onnxruntime", "av"} <= used and "engines" not in used  # the demo really ran the model on video
    owners = metadata.packages_distributions()
    allowed = core_closure() | {"graphflow"}
    outside = {}
    for module in sorted(used - set(sys.stdlib_module_names)):
        dists = {_name(d) for d in owners.get(module, [])}
        if dists and not dists & allowed:
            outside[module] = sorted(dists)
    assert not outside, f"the demo imports modules of packages that a plain install lacks: {outside}"
