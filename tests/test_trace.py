import json

import pytest

from plait.trace import Event, Timeline


def test_bubble_fraction_and_busy_merge_overlaps():
    tl = Timeline(
        2,
        [
            Event(0, "F0.0", "F", 0.0, 1.0),
            Event(0, "W0.0", "W", 0.5, 1.5),
            Event(1, "F1.0", "F", 1.0, 2.0),
            Event(1, "x", "SEND_ACT", 0.0, 2.0),
        ],
    )
    assert tl.busy(0) == 1.5 and tl.busy(1) == 1.0
    assert abs(tl.bubble_fraction() - (1 - 2.5 / 4.0)) < 1e-12


def test_chrome_trace_has_one_track_per_rank(tmp_path):
    tl = Timeline(3, [Event(r, f"F{r}.0", "F", r, r + 1.0, r, 0) for r in range(3)])
    data = json.loads(tl.write_chrome_trace(tmp_path / "t.json").read_text())
    meta = [e for e in data["traceEvents"] if e["ph"] == "M"]
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["pid"] for e in meta) == [0, 1, 2]
    assert sorted(e["pid"] for e in spans) == [0, 1, 2]
    assert spans[0]["ts"] == 0 and spans[0]["dur"] == 1e6
    png = tl.draw(tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_costs_are_median_durations_relative_to_the_forward():
    ev = [Event(0, "F", "F", 0, d) for d in (2.0, 2.0, 9.0)]  # a slow outlier: medians
    ev += [Event(1, "B", "B", 0, d) for d in (3.0, 2.0)] + [Event(1, "W", "W", 0, 1.0)]
    assert Timeline(2, ev).schedule_costs() == (1.0, 1.25, 0.5)
    with pytest.raises(ValueError, match=r"no B actions in this timeline \(it has \['BW', 'F'\]\)"):
        Timeline(1, [Event(0, "F", "F", 0, 1), Event(0, "BW", "BW", 1, 3)]).schedule_costs()
