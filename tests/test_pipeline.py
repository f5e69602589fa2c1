"""Partitioning and the pipeline runtime: equivalence with single-process training.

In-process tests use a one-rank pipeline (no processes: every action, B/W split included, runs
locally). Multi-process tests run real gloo workers and batch many schedules into one launch.
"""

import time

import pp_workers as W
import pytest
import torch

from plait import WorkerError, launch
from plait.models.transformer import Transformer, get_config
from plait.pipeline import PipelineRuntime, Stage, build_schedule, partition, split_batch

RTOL = 1e-9


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny float64 models: extra intra-op threads only contend on a loaded 2-core machine
    # (measured 60x slower with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close_grads(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(want) ^ set(got))
    for name, g in got.items():
        w = want[name]
        # relative to the tensor's scale; gradients that are mathematically zero (key biases,
        # softmax is shift-invariant) come out as ~1e-21 rounding noise on both sides
        err = (g - w).abs().max().item()
        assert err <= RTOL * w.abs().max().item() + 1e-15, f"{name}: error {err:.3g}"


def assert_close_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= RTOL * abs(b), (got, want)


# -- partitioning --------------------------------------------------------------------------------


def test_partition_shares_parameters_and_names():
    model = Transformer(get_config("tiny", n_layers=5), seed=0).double()
    stages = partition(model, 3)
    assert [s.block_indices for s in stages] == [[0, 1], [2, 3], [4]]
    original = dict(model.named_parameters())
    seen = {}
    for s in stages:
        for name, p in s.named_parameters():
            assert original[name] is p  # the same object, under the model's own name
            seen[name] = p
    assert set(seen) == set(original)
    assert hasattr(stages[0], "embed") and hasattr(stages[-1], "head")
    x = torch.randint(0, 256, (2, 16))
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)


def test_partition_balances():
    model = Transformer(get_config("tiny", n_layers=8, hidden=32, ffn=64), seed=0)
    by_layers = partition(model, 4, balance="layers")
    assert [len(s.block_indices) for s in by_layers] == [2, 2, 2, 2]
    assert [len(s.block_indices) for s in partition(model, 3)] == [3, 3, 2]
    # embed (256 x 32 + 128 x 32) and head (256 x 32) weigh about two blocks each here
    by_params = partition(model, 4, balance="params")
    sizes = [sum(p.numel() for p in s.parameters()) for s in by_params]
    assert len(by_params[0].block_indices) < len(by_params[1].block_indices)
    assert max(sizes) < max(sum(p.numel() for p in s.parameters()) for s in by_layers)
    by_time = partition(model, 2, balance="time")
    assert sum(len(s.block_indices) for s in by_time) == 8
    assert model.embed.tok.weight.grad is None  # profiling leaves no gradients behind
    explicit = partition(model, 3, balance=[0, 6, 2])
    assert [s.block_indices for s in explicit] == [[], [0, 1, 2, 3, 4, 5], [6, 7]]


def test_partition_errors_name_the_problem():
    model = Transformer(get_config("tiny", n_layers=2), seed=0)
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 stages by layers"):
        partition(model, 3)
    with pytest.raises(ValueError, match="only 4 units; use at most 4 stages"):
        partition(model, 5, balance="params")
    with pytest.raises(ValueError, match=r"balance \[1, 0, 1\] leaves stage 1 empty"):
        partition(model, 3, balance=[1, 0, 1])
    with pytest.raises(ValueError, match=r"places 3 blocks but the model has 2"):
        partition(model, 2, balance=[1, 2])
    with pytest.raises(ValueError, match="balance must be 'layers', 'params', 'time'"):
        partition(model, 2, balance="flops")
    with pytest.raises(ValueError, match="embed -> blocks"):
        partition(torch.nn.Linear(2, 2), 2)


def test_split_batch():
    assert split_batch(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="a batch of 3 cannot be split into 4 micro-batches"):
        split_batch(3, 4)
    with pytest.raises(
        ValueError, match=r"does not divide into 4 .* counts that divide it: \[1, 2, 5, 10\]"
    ):
        split_batch(10, 4, uneven=False)


# -- one-rank runtime (in process) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name,checkpoint", [("1f1b", False), ("zb-h1", False), ("zb-h1", True), ("gpipe", True)]
)
def test_one_rank_pipeline_matches_gradient_accumulation(name, checkpoint):
    steps = [(6, 16, 1), (5, 8, 2)]  # batch and sequence change; 5 splits unevenly in 3
    ref_losses, ref_grads = W.reference(steps)
    model = Transformer(W.CFG, seed=0).double()
    (stage,) = partition(model, 1)
    rt = PipelineRuntime({0: stage}, build_schedule(name, 1, 3), None, Transformer.loss, checkpoint)
    losses = []
    for k, (B, T, seed) in enumerate(steps):
        x, y = W.batch(B, T, seed)
        model.zero_grad(set_to_none=True)
        losses.append(rt.train_step(x, y))
        assert_close_grads({n: p.grad for n, p in model.named_parameters()}, ref_grads[k])
        with torch.no_grad():
            for p in model.parameters():
                p -= W.LR * p.grad
    assert_close_losses(losses, ref_losses)
    assert [e.name for e in rt.timeline.events] == [str(a) for a in rt.schedule.actions[0]]
    # zero bubble's recording Linear forwards live only during a training step: other code
    # running the same modules (another runtime, PyTorch's pipelining) never meets them
    assert not any("forward" in m.__dict__ for m in model.modules())
    x, _ = W.batch(5, 8, 3)
    torch.testing.assert_close(rt.forward(x), model(x), rtol=1e-12, atol=1e-12)
    rt.close()


def test_zero_bubble_weight_gradients_are_those_of_the_product_whatever_hooks_do():
    # W forms dW = dy^T x from the Linear's own input and output: a forward hook that replaces
    # the output (x2 here) or a pre-hook that replaces the input must not change what dy is
    # taken of; a Linear whose forward was replaced on the instance is left whole to B.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
    ).double()
    net[0].register_forward_hook(lambda m, args, out: out * 2.0)
    net[2].register_forward_pre_hook(lambda m, args: (args[0].flip(-1),))
    plain_forward = net[3].forward
    net[3].forward = lambda x: plain_forward(x) - 1.0

    def loss(y, t):
        return ((y - t) ** 2).mean()

    x, t = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss(net(x), t).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    rt = PipelineRuntime({0: net}, build_schedule("zb-h1", 1, 3), None, loss)
    assert [m for ms in rt._deferred.values() for m in ms] == [net[0], net[2]]
    rt.train_step(x, t)
    assert_close_grads({n: p.grad for n, p in net.named_parameters()}, want)
    assert "forward" not in net[0].__dict__ and "forward" in net[3].__dict__
    rt.close()


def test_runtime_refuses_a_mismatch_before_running():
    stages = partition(Transformer(W.CFG, seed=0), 2)
    with pytest.raises(ValueError, match="is for 2 pipeline ranks but the mesh has pp=1"):
        PipelineRuntime({0: stages[0]}, build_schedule("1f1b", 2, 4), None, Transformer.loss)
    rt = PipelineRuntime.from_model(Transformer(W.CFG, seed=0), build_schedule("gpipe", 1, 2))
    assert list(rt.stages) == [0] and rt.stages[0].is_first and rt.stages[0].is_last
    one = partition(Transformer(W.CFG, seed=0), 1)
    with pytest.raises(ValueError, match=r"runs stages \[0\] .* but was given stages \[1\]"):
        PipelineRuntime({1: one[0]}, build_schedule("1f1b", 1, 4), None, Transformer.loss)
    assert isinstance(one[0], Stage)


# -- multi-process -------------------------------------------------------------------------------

SCHEDULE_CASES = [
    ("gpipe", None),
    ("1f1b", None),
    ("interleaved-1f1b", 2),
    ("zb-h1", None),
    ("zb-v", None),
]


def _check_cases(results: list[list[dict]]) -> None:
    for ci in range(len(results[0])):
        case = results[0][ci]["case"]
        ref_losses, ref_grads = W.reference(case["steps"])
        for k in range(len(case["steps"])):
            got = {}
            for rank in results:
                got.update(rank[ci]["grads"][k])  # tp replicas overwrite with equal values
            assert_close_grads(got, ref_grads[k])
        for rank in results:  # every pipeline rank reports the same loss
            assert_close_losses(rank[ci]["losses"], ref_losses)
            assert rank[ci]["timeline_ok"], case
            # CPU ranks on one host talk through shared memory unless told otherwise
            assert rank[ci]["transport"] == ("process-group" if case.get("transport") else "shm")
        inferred = [r[ci]["infer"] for r in results if r[ci]["infer"] is not None]
        assert inferred, "no rank returned the inference output"
        model = Transformer(W.CFG, seed=0).double()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(
                    next(r[ci]["params_after"][n] for r in results if n in r[ci]["params_after"])
                )
            B, T, seed = case["steps"][-1]
            want = model(W.batch(B, T, seed)[0])
        for out in inferred:
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_p2_every_schedule_matches_single_process_with_tensor_parallel_peers():
    # Mesh pp=2 x tp=2: each tp coordinate runs its own pipeline and must talk to its own peer.
    # Sequence length and batch size change between steps (8 -> 6 splits unevenly into 4).
    steps = [(8, 16, 1), (8, 8, 2), (6, 24, 3)]
    cases = [dict(name=n, v=v, m=4, steps=steps) for n, v in SCHEDULE_CASES]
    cases.append(dict(name="1f1b", m=4, steps=steps[:2], checkpoint=True))
    cases.append(dict(name="zb-h1", m=3, steps=steps[:2], balance="params", checkpoint=True))
    # gloo itself, and rings so small that activations take the process group while headers and
    # the loss take the rings (each route keeps its own order)
    cases.append(dict(name="1f1b", m=4, steps=steps, transport="process-group"))
    cases.append(dict(name="interleaved-1f1b", v=2, m=4, steps=steps, ring_bytes=2048))
    results = launch(W.run_cases, 4, (1, 2, 2), cases, threads_per_worker=1)
    _check_cases(results)
    assert results[0][0]["merged_ranks"] == [0, 1]


@pytest.mark.slow
def test_p4_every_schedule_matches_single_process_and_m_below_p_runs():
    steps = [(8, 8, 1), (10, 12, 2)]  # 10 splits unevenly into 8
    cases = [dict(name=n, v=v, m=8, steps=steps) for n, v in SCHEDULE_CASES]
    # m < p: fewer micro-batches than ranks still runs (and matches), never hangs
    cases += [dict(name=n, v=v, m=2, steps=steps[:1]) for n, v in SCHEDULE_CASES]
    # every way of posting receives (gloo's default posts them all at the step's start)
    cases += [dict(name="zb-v", v=2, m=8, steps=steps, prefetch=k) for k in ("timed", 0, 2)]
    # schedules built for unequal F, B, W times (plait train --schedule-costs)
    cases += [
        dict(name="zb-v", v=2, m=8, steps=steps, costs=(1.0, 1.18, 0.7)),
        dict(name="zb-h1", m=8, steps=steps, costs=(1.0, 1.5, 0.5)),
    ]
    t0 = time.monotonic()
    results = launch(W.run_cases, 4, (1, 4, 1), cases, threads_per_worker=1, timeout=60)
    assert time.monotonic() - t0 < 120
    _check_cases(results)
    for ci in range(len(SCHEDULE_CASES), 2 * len(SCHEDULE_CASES)):
        assert max(r[ci]["seconds"] for r in results) < 10


@pytest.mark.slow
def test_bad_batches_are_refused_before_any_message():
    t0 = time.monotonic()
    found = launch(W.refusals, 2, 4, threads_per_worker=1, timeout=20)
    assert time.monotonic() - t0 < 30
    for rank in found:
        assert "a batch of 3 cannot be split into 4 micro-batches" in rank["too_small"]
        assert "a batch of 5 does not divide into 4 micro-batches" in rank["indivisible"]
    assert found[0]["uneven_loss"] == found[1]["uneven_loss"]
    ref, _ = W.reference([(5, 8, 0)])
    assert_close_losses([found[0]["uneven_loss"]], ref)


@pytest.mark.slow
def test_1f1b_holds_at_most_p_micro_batches_where_gpipe_holds_m():
    m = 8
    gpipe = launch(W.saved_activation_peak, 2, "gpipe", m, threads_per_worker=1)
    one_f = launch(W.saved_activation_peak, 2, "1f1b", m, threads_per_worker=1)
    # measured with saved-tensor hooks, in micro-batches' worth of saved activations
    assert [round(r["in_flight"], 6) for r in gpipe] == [m, m]
    assert [round(r["in_flight"], 6) for r in one_f] == [2, 1]
    # and the validator predicted both
    assert [r["validator"] for r in gpipe] == [m, m]
    assert [r["validator"] for r in one_f] == [2, 1]


def test_worker_error_type_is_exported():
    assert issubclass(WorkerError, RuntimeError)


def test_prefetch_must_name_a_policy():
    (stage,) = partition(Transformer(W.CFG, seed=0), 1)
    sched = build_schedule("1f1b", 1, 2)
    with pytest.raises(ValueError, match=r"prefetch='soon' is not valid; use 'all', 'timed'"):
        PipelineRuntime({0: stage}, sched, prefetch="soon")
