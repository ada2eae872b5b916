"""Short form of bench/soak.py: a looping multi-process graph with fan-out keeps its shared memory
constant, leaves nothing behind and stops cleanly on SIGINT."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_keeps_shared_memory_constant_and_exits_clean():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.35", "--interval", "3"],
                         capture_output=True, text=True, timeout=180)
    report = f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-2000:]}"  # what a failure shows
    assert out.returncode == 0, report
    result = json.loads(out.stdout.splitlines()[-1].removeprefix("RESULT "))
    assert result["exit_code"] == 0 and result["frames"] > 20, report
    assert result["dev_shm_segments"] == 0 and result["memfds_after_exit"] == 0, report
    assert result["leftover_processes"] == 0, report
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    fds = [int(r[4]) for r in rows]
    assert len(fds) >= 5 and len(set(fds[-3:])) == 1, report  # pools stop growing once warm: slots are reused
