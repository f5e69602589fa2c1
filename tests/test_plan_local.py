"""The measured parts of the local hardware spec: all-reduce curve and per-size compute scale."""

import pytest

from plait.plan import get_hardware
from plait.plan.hardware import HardwareSpec, Link


def test_all_reduce_curve_interpolates_and_extrapolates():
    link = Link("x", 1e9, 1e-4, ((4.0, 1e-4), (1e6, 1e-3), (4e6, 4e-3)))
    assert link.all_reduce_time(4.0, 2) == pytest.approx(1e-4)
    assert link.all_reduce_time(2.5e6, 2) == pytest.approx(2.5e-3)
    assert link.all_reduce_time(8e6, 2) == pytest.approx(8e-3)  # the last segment's slope
    assert link.all_reduce_time(1e6, 1) == 0.0
    assert link.all_gather_time(1e6, 2) == pytest.approx(0.5e-3)
    # without a curve, the latency-bandwidth formula
    plain = Link("y", 1e9, 1e-5)
    assert plain.all_reduce_time(1e6, 2) == pytest.approx(2e-5 + 1e-3)


def test_compute_scale_by_tokens_and_round_trip():
    base = get_hardware("a100-80gb")
    assert base.compute_scale_at(123) == 1.0
    d = base.to_dict()
    d.update(compute_scale=1.3, compute_scale_by_tokens=[[128, 1.5], [512, 1.1]])
    d["intra"]["all_reduce_curve"] = [[4, 1e-4], [1e6, 1e-3]]
    spec = HardwareSpec.from_dict(d)
    assert spec.compute_scale_at(64) == 1.5 and spec.compute_scale_at(1024) == 1.1
    assert spec.compute_scale_at(256) == pytest.approx(1.3)  # halfway in log tokens
    assert spec.intra.all_reduce_time(1e6, 2) == pytest.approx(1e-3)
    assert HardwareSpec.from_dict(spec.to_dict()) == spec


def test_packaged_calibration_table_matches_the_shared_one():
    from pathlib import Path

    from plait.plan.published import calibration_dir, load_rows

    packaged = Path(__import__("plait.plan", fromlist=["x"]).__file__).parent / "data"
    assert len(load_rows(packaged)) == 10  # the Megatron-LM 2021 table ships with plait
    if calibration_dir() != packaged:  # the workspace's copy is next to the repository
        shared = {
            r["params_b"]: r
            for r in load_rows(calibration_dir())
            if r["file"] == "megatron2021_table1.csv"
        }
        for row in load_rows(packaged):
            assert shared[row["params_b"]] == row
