"""The annotated video's labels and trails: tags placed so none covers another, trails that leave with their track."""
from __future__ import annotations

import numpy as np

from graphflow.vision.osd import LabelLayout, Overlay, color_for, draw, overlaps

H, W = 360, 640
DOOR = {"id": "door", "kind": "line_cross", "line": [[320, 0], [320, 360]], "counts": {"A->B": 3, "B->A": 5}}
YARD = {"id": "yard", "kind": "zone", "polygon": [[200, 80], [450, 80], [450, 300], [200, 300]], "inside": 7}


def crowd(n: int, seed: int) -> list[dict]:
    """`n` people's tracks piled into the middle of the frame, around the line and inside the zone."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.uniform(150, 450), rng.uniform(0, 250)
        box = np.round([x, y, x + rng.uniform(30, 90), y + rng.uniform(60, 120)], 2).tolist()  # detections' decimals
        out.append({"box": box, "track_id": i + 1, "label": "person", "score": 0.8})
    return out


def test_labels_of_a_crowded_frame_do_not_overlap_and_are_drawn_where_placed():
    for seed in range(5):
        objects = crowd(40, seed)
        layout = LabelLayout(W, H)
        out = draw(np.zeros((H, W, 3), np.uint8), objects, rules=[DOOR, YARD], color="rgb", layout=layout)
        texts = [label.text for label in layout.labels]
        assert texts[:2] == ["door  A>B 3  B>A 5", "yard: 7"] and sorted(texts[-2:]) == ["A", "B"]
        assert len(texts) == 2 + len(objects) + 2
        rects = [label.rect for label in layout.labels]
        for i, a in enumerate(rects):
            assert 0 <= a[0] and 0 <= a[1] and a[2] <= W and a[3] <= H, (seed, texts[i], a)
            for j in range(i):
                assert not overlaps(a, rects[j]), (seed, texts[i], texts[j])
        for label in layout.labels:  # each tag is on the frame, in its colour, over every box outline
            x0, y0, x1, y1 = (int(v) for v in label.rect)
            tag = out[y0:y1, x0:x1].reshape(-1, 3)
            assert (tag == label.fill).all(1).mean() > 0.5, (seed, label.text)
        box_tags = {label.text.split()[0]: label for label in layout.labels if label.text.startswith("#")}
        for obj in objects:  # a tag that had to move away from its box is joined to it by a leader line
            label = box_tags[f"#{obj['track_id']}"]
            reach = label.rect[3] - label.rect[1] + 1  # a tag's own height: how far it may slide without a leader
            bx0, by0, bx1, by1 = obj["box"]
            near = overlaps(label.rect, (bx0 - reach, by0 - reach, bx1 + reach, by1 + reach))
            assert near or label.leader == (bx0, by0), (seed, label)
        assert any(label.leader for label in layout.labels), "a crowd this dense moves some tags away from their box"


def test_a_line_caption_keeps_its_place_and_box_labels_move_away_from_it():
    """A box right under the line's caption: the caption stays at the top of the line, the box's label goes
    inside its box instead of covering the caption."""
    layout = LabelLayout(W, H)
    person = {"box": [300, 16, 380, 120], "track_id": 4, "label": "person"}
    draw(np.zeros((H, W, 3), np.uint8), [person], rules=[DOOR], layout=layout)
    caption, tag = layout.labels[0], layout.labels[1]
    assert caption.rect[:2] == (324, 4) and tag.text == "#4 person"
    assert not overlaps(caption.rect, tag.rect) and tag.rect[0] == 300 and 16 <= tag.rect[1] <= 40


def test_a_trail_leaves_the_screen_with_its_track_and_comes_back_with_it():
    overlay = Overlay(trail=30)
    frame = np.zeros((120, 160, 3), np.uint8)

    def step(seq: int, present: bool) -> np.ndarray:
        track = {"box": [10 + 10 * seq, 40, 30 + 10 * seq, 80], "track_id": 1}
        return overlay.render(frame, seq, [track] if present else [], color="rgb")

    shown = [step(seq, True) for seq in range(5)]
    trail = shown[4][80, 25:55]  # bottom-centre points of frames 0-4: x = 20 … 60, y = 80; the box ends at x = 50
    assert (trail == color_for(1)).all(1).any()
    gone = step(5, False)
    assert not gone.any()  # ended: neither box nor trail on screen
    back = step(6, True)
    assert (back[80, 25:55] == color_for(1)).all(1).any()  # the same track again: its trail goes on
    assert len(overlay.trails[1]) == 6
