"""Hugging Face decoders cut into pipeline stages: the stages compute the whole model, in one
process and on real processes with every schedule, exactly (float64)."""

import hf_models
import pp_workers
import pytest
import torch

from plait import launch
from plait.models import resolve_model
from plait.models.layout import find_layout
from plait.pipeline import partition

pytest.importorskip("transformers")

STEPS = [(4, 16, 1), (4, 16, 2), (6, 12, 3)]


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def family_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, hf_models.save(request.param, d)


def test_stages_chained_are_the_model_with_its_gradients(family_dir):
    family, d = family_dir
    source = resolve_model(f"hf:{d}")
    full = source.build(0).double()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    ref = full(x).logits
    source.loss(ref, y).backward()
    want = {n: p.grad.clone() for n, p in full.named_parameters()}
    assert find_layout(full).kind == "decoder"
    for n in (2, 3, 4):
        full.zero_grad(set_to_none=True)
        stages = partition(full, n)
        h = x
        for st in stages:
            h = st(h)
        assert torch.equal(h, ref), (family, n)
        source.loss(h, y).backward()
        for name, p in full.named_parameters():
            # a tied matrix sums its two gradients in another order: equal to rounding
            torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-15)
        names = {k for st in stages for k, _ in st.named_parameters()}
        assert names >= set(want)  # every parameter lives on a stage, under its own name


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"])
def test_every_schedule_matches_one_process_in_float64(family_dir, schedule):
    family, d = family_dir
    losses, grads = pp_workers.hf_reference(d, STEPS)
    workers = launch(
        pp_workers.hf_pipeline, 2, (1, 2, 1), d, schedule, 4, STEPS, threads_per_worker=1
    )
    for rank in workers:
        for step, (got, want) in enumerate(zip(rank["losses"], losses)):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (family, schedule, step)
        for step, g in enumerate(rank["grads"]):
            for name, t in g.items():
                torch.testing.assert_close(t, grads[step][name], rtol=1e-9, atol=1e-12)


def test_what_cannot_be_cut_is_refused_naming_what_was_looked_for():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"cannot cut Odd into pipeline stages: .*looked for"):
        partition(Odd(), 2)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 1, 2), (1, 2, 1), (1, 2, 2)], ids=str)
def test_clipping_counts_every_shard_once_and_replicas_stay_identical(tmp_path, mesh):
    # plait.clip_grad_norm_ on a model split over tp and pp equals torch's global-norm clipping
    # of the whole model, step after step (max_norm small enough to clip every step), and the
    # replicated parameters (norms) stay bit-identical across the tensor group for 20 steps
    d = hf_models.save("llama", tmp_path / "llama")
    steps, max_norm = 20, 0.05
    ref = pp_workers.hf_clip_reference(d, steps, max_norm)
    assert min(ref["norms"]) > max_norm  # clipping is active on every step
    world = mesh[0] * mesh[1] * mesh[2]
    for rank in launch(pp_workers.hf_clip, world, mesh, d, steps, max_norm):
        for a, b in zip(rank["norms"], ref["norms"]):
            assert a == pytest.approx(b, rel=1e-9)
        for a, b in zip(rank["losses"], ref["losses"]):
            assert a == pytest.approx(b, rel=1e-9)
        assert rank["replicated_identical"]
