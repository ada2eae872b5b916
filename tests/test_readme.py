"""The README's Engine example, run as a user runs it: myengines.py in their folder, the demo graph edited as the
README says, the `graphflow` command started from that folder (no import-path help from the test)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 12


def test_readme_engine_example_runs_from_the_users_folder(tmp_path):
    source = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "myengines.py").write_text(source)
    (tmp_path / "graphs" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "graphs/data/demo.mp4", tmp_path / "graphs/data/demo.mp4")
    doc = json.loads((ROOT / "graphs/demo.json").read_text())
    doc["engines"]["src"]["params"]["sources"][0]["max_frames"] = FRAMES  # a short run
    doc["engines"]["out"]["params"]["sinks"][0]["path"] = str(tmp_path / "out.jsonl")
    doc["engines"]["count"] = {"type": "myengines:CountPeople"}  # as the README says: det.out → count.in → trk.in
    doc["connections"] = [c for c in doc["connections"] if c != ["det.out", "trk.in"]]
    doc["connections"] += [["det.out", "count.in"], ["count.out", "trk.in"]]
    (tmp_path / "graphs/demo.json").write_text(json.dumps(doc, indent=1))

    graphflow = str(Path(sys.executable).with_name("graphflow"))  # the command installed beside this Python
    run = subprocess.run([graphflow, "launch", "graphs/demo.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("graphflow: clean"), run.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    frames = [r for r in rows if "people" in r]
    assert len(frames) == FRAMES
    assert all(r["people"] == sum(d["label"] == "person" for d in r["detections"]) for r in frames)
    totals = [r for r in rows if "person_detections" in r]
    assert [(r["stream"], r["person_detections"]) for r in totals] == [("cam1", sum(r["people"] for r in frames))]
    assert totals[0]["person_detections"] > 0


def test_readme_service_curl_examples_run_as_written(tmp_path):
    """The `graphflow serve` curl lines of the README, run in order against a real service started as the README
    says (from a copy of the repository's graphs folder): each answers without an error."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    if not shutil.which("curl"):
        import pytest

        pytest.skip("needs curl")
    block = re.search(r"In another terminal:\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(lines) >= 5
    shutil.copytree(ROOT / "graphs", tmp_path / "graphs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    graphflow = str(Path(sys.executable).with_name("graphflow"))
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([graphflow, "serve", "graphs/demo.json", "--port", str(port), "--state", "site.db"],
                             cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
                break
            except OSError:
                time.sleep(0.3)
        for line in lines:
            run = subprocess.run(line.replace("localhost:8080", f"localhost:{port}"), shell=True, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and not run.stdout.startswith('{"error"'), (line, run.stdout, run.stderr)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()
    assert os.path.exists(tmp_path / "site.db")


def test_readme_int8_steps_run_as_written(tmp_path):
    """The INT8 paragraph's command from the repository's folder, then its model in graphs/demo.json, launched."""
    text = (ROOT / "README.md").read_text()
    command = re.search(r"INT8: from the repository's folder,\s+`(graphflow model quantize [^`]*)`", text).group(1)
    model = re.search(r'then `"model": "([^"]+)"` on\s+infer in\s+`graphs/demo.json`', text).group(1)
    (tmp_path / "graphs" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "graphs/data/demo.mp4", tmp_path / "graphs/data/demo.mp4")
    doc = json.loads((ROOT / "graphs/demo.json").read_text())
    doc["engines"]["src"]["params"]["sources"][0]["max_frames"] = FRAMES  # a short run
    doc["engines"]["det"]["params"]["model"] = model
    (tmp_path / "graphs/demo.json").write_text(json.dumps(doc, indent=1))

    graphflow = str(Path(sys.executable).with_name("graphflow"))
    argv = [graphflow, *command.split()[1:], "--frames", "8"]  # as written, calibrated on fewer frames for time
    quantize = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert quantize.returncode == 0, quantize.stderr
    assert "calibrating" in quantize.stderr and "8/8" in quantize.stderr  # the progress bar, on stderr
    run = subprocess.run([graphflow, "launch", "graphs/demo.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "graphs/demo.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "detections" in r]) == FRAMES
    assert any(r["detections"] for r in rows if "detections" in r)  # the INT8 model finds things
