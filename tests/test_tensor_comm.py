"""Communication accounting: the collectives per block per step are what the design says."""

import pytest
import tp_workers

from plait import launch
from plait.comm import CommStats

B, T, H = tp_workers.B, tp_workers.T, tp_workers.CFG.hidden
ACT = B * T * H * 8  # bytes of one float64 activation (B, T, H)


def test_comm_stats_counts_and_filters():
    s = CommStats()
    s.record("all_reduce", 100, axis="tp", phase="forward")
    s.record("all_reduce", 100, axis="tp", phase="backward")
    s.record("send", 40, axis="pp")
    assert s.calls("all_reduce") == 2 and s.bytes("all_reduce") == 200
    assert s.calls(axis="tp", phase="backward") == 1
    assert s.bytes() == 240
    assert s.metrics() == {
        "comm.pp.send.calls": 1,
        "comm.pp.send.bytes": 40,
        "comm.tp.all_reduce.calls": 2,
        "comm.tp.all_reduce.bytes": 200,
        "comm.calls": 3,
        "comm.bytes": 240,
    }
    s.reset()
    assert s.calls() == 0 and s.metrics() == {"comm.calls": 0, "comm.bytes": 0}


@pytest.mark.slow
def test_a_block_costs_two_all_reduces_forward_and_two_backward():
    tp = 2
    for r in launch(tp_workers.block_counts, tp, tp, False):
        # attention's region and the MLP each: one all-reduce of the (B, T, H) activation
        assert r["forward"] == {("all_reduce", "forward"): (2, 2 * ACT)}
        assert r["backward"] == {("all_reduce", "backward"): (2, 2 * ACT)}


@pytest.mark.slow
def test_sequence_parallel_block_swaps_all_reduce_for_gather_and_scatter():
    tp = 2
    for r in launch(tp_workers.block_counts, tp, tp, True):
        # the same bytes as the all-reduces, split into an all-gather going in, reduce-scatter out
        assert r["forward"] == {
            ("all_gather", "forward"): (2, 2 * ACT),
            ("reduce_scatter", "forward"): (2, 2 * ACT),
        }
        # ... and the conjugates backward, plus one small all-reduce per replicated parameter
        # that saw only this rank's tokens: norm1 and norm2 weight and bias, o_proj and fc_out bias
        assert r["backward"] == {
            ("all_gather", "backward"): (2, 2 * ACT),
            ("reduce_scatter", "backward"): (2, 2 * ACT),
            ("all_reduce", "backward"): (6, 6 * H * 8),
        }


@pytest.mark.slow
def test_a_training_step_reports_its_communication():
    tp = 2
    L = tp_workers.CFG.n_layers
    for m in launch(tp_workers.model_counts, tp, tp):
        # forward: 2 per block, the embedding's, the loss's max and its sums
        assert m["forward_all_reduce"] == 2 * L + 1 + 2
        # backward: 2 per block and the head's input gradient
        assert m["backward_all_reduce"] == 2 * L + 1
        assert m["comm.tp.all_reduce.calls"] == 4 * L + 4
        assert m["comm.bytes"] == m["comm.tp.all_reduce.bytes"] > 0
