"""Checks what the README's first command produced: the demo's JSON lines and its annotated video."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def find(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        sys.exit(f"check_demo: {name} was not written under {root}")
    return hits[0]


def main() -> None:
    root = Path(sys.argv[1])
    jsonl = find(root, "demo.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    frames = [r for r in records if "detections" in r or "tracks" in r]
    if len(frames) < 10:
        sys.exit(f"check_demo: {jsonl} holds {len(frames)} frame records, expected the demo's frames")
    boxes = sum(len(r.get("tracks") or r.get("detections") or []) for r in frames)
    if boxes == 0:
        sys.exit(f"check_demo: {jsonl} has no detections at all: the detector did not run")
    import av  # the fresh venv's own PyAV

    video = find(root, "demo_annotated*.mp4")
    with av.open(str(video)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    if decoded < len(frames) // 2:
        sys.exit(f"check_demo: {video} decodes to {decoded} frames, expected about {len(frames)}")
    print(f"check_demo: ok — {jsonl.name}: {len(frames)} frame records, {boxes} boxes; {video.name}: {decoded} frames")


if __name__ == "__main__":
    main()
