"""GradSync: bucketed data-parallel averaging into persistent buffers, on real gloo processes."""

import pytest
import torch
import workers

from plait import launch


@pytest.mark.parametrize("set_to_none", [True, False])
def test_grad_sync_averages_every_bucket_into_its_buffer(set_to_none):
    results = launch(workers.grad_sync_steps, 2, set_to_none)
    (steps0, buckets), (steps1, _) = results
    assert buckets > 1  # several buckets, each reduced on its own
    for s0, s1 in zip(steps0, steps1):
        assert s0["views"] and s1["views"]  # .grad is the bucket's slice: nothing copied back
        for g0, g1, o0, o1 in zip(s0["synced"], s1["synced"], s0["own"], s1["own"]):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # identical on both ranks
            torch.testing.assert_close(g0, (o0 + o1) / 2)  # the average of the ranks' own


def test_grad_sync_keeps_each_dtype_in_its_own_bucket():
    buckets, da, ga, db, gb = launch(workers.grad_sync_mixed_dtypes, 2)[0]
    assert buckets == 2
    assert (da, ga) == (torch.float64, [1.5] * 3)  # mean of 1 and 2
    assert (db, gb) == (torch.float32, [2.5] * 2)  # mean of 2 and 3
