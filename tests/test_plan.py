"""The planner: model and hardware specs, the published Megatron-LM runs, physics, the CLI."""

import json

import pytest

from plait.cli import main
from plait.config import ParallelConfig
from plait.models.transformer import PRESETS
from plait.plan.calibrate import get_hardware
from plait.plan.evaluate import evaluate
from plait.plan.inference import plan_inference
from plait.plan.memory import analytic_in_flight
from plait.plan.model_spec import custom_model, get_model
from plait.plan.published import load_rows, model_of_row, plan_row, predict_row
from plait.plan.search import search

# Published sizes: Meta's model cards (Llama 2: 6.74B, 68.98B; Llama 3: 8.03B, 70.55B, 405B),
# Brown et al. 2020 (GPT-3 175B).
PUBLISHED = {
    "gpt3-175b": 175e9,
    "llama2-7b": 6.74e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3-405b": 405e9,
}


@pytest.mark.parametrize("name,size", sorted(PUBLISHED.items()))
def test_preset_parameters_within_1pct(name, size):
    assert get_model(name).num_parameters() == pytest.approx(size, rel=0.01)


def test_megatron_family_and_plait_presets():
    for row in load_rows():
        m = model_of_row(row)
        # within 1%, or the table's rounding to 0.1B (1.65B is printed as 1.7)
        tol = max(0.01 * float(row["params_b"]), 0.05) * 1e9
        assert m.num_parameters() == pytest.approx(float(row["params_b"]) * 1e9, abs=tol), m.name
        # the paper's own formula P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))
        L, h, V, s = m.layers, m.hidden, m.vocab, m.seq_len
        assert m.num_parameters() == pytest.approx(
            12 * L * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * L * h)), rel=1e-3
        )
    for name in ("tiny", "small"):
        assert get_model(name).num_parameters() == PRESETS[name].num_parameters()


def test_flops_match_megatron_formula():
    m = get_model("megatron-145b")
    s, L, h, V = m.seq_len, m.layers, m.hidden, m.vocab
    paper = 96 * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h)) / s  # per token
    assert m.flops_per_token(recompute="full") == pytest.approx(paper, rel=1e-6)
    assert m.flops_per_token(recompute="none") < m.flops_per_token(recompute="selective") < paper


def test_activation_memory_korthikanti():
    m = get_model("gpt3-175b")
    s, b, h, a, t = 2048, 1, m.hidden, m.heads, 8
    base = s * b * h * (34 + 5 * a * s / h)
    assert m.activation_bytes_per_layer(s, b) == pytest.approx(base)
    assert m.activation_bytes_per_layer(s, b, tp=t) == pytest.approx(
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    )
    assert m.activation_bytes_per_layer(s, b, tp=t, sp=True) == pytest.approx(base / t)
    assert m.activation_bytes_per_layer(
        s, b, tp=t, sp=True, recompute="selective"
    ) == pytest.approx(34 * s * b * h / t)
    assert m.activation_bytes_per_layer(s, b, recompute="full") == pytest.approx(2 * s * b * h)


def test_custom_model_and_errors():
    m = custom_model(layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256)
    assert m.gated_mlp and m.ffn == 11008 and m.kv_dim == 1024
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        get_model("gpt5")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="kv_heads=5"):
        custom_model(layers=2, hidden=64, heads=4, kv_heads=5, vocab=10)


def test_links_by_placement():
    hw = get_hardware("h100-sxm")
    assert hw.link_between(0, 7).name == "nvswitch"
    assert hw.link_between(0, 8).name == "infiniband"
    assert get_hardware("h100-pcie").link_between(0, 7).name == "pcie"


def test_memory_in_flight_matches_simulator():
    model, hw = get_model("llama2-7b"), get_hardware("a100-80gb")
    for sched, v in (("1f1b", 1), ("interleaved-1f1b", 2), ("gpipe", 1)):
        cfg = ParallelConfig(
            pp=4, num_microbatches=8, schedule=sched, virtual=v, recompute="full", dtype="bf16"
        )
        est = evaluate(model, hw, cfg)
        assert est.sim is not None
        assert est.sim.peak_in_flight == pytest.approx(analytic_in_flight(sched, 4, 8, v)), sched


@pytest.fixture(scope="module")
def rows():
    return load_rows()


@pytest.mark.timeout(900)  # a search per published run: minutes when the machine is shared
def test_published_throughput_within_15pct_and_planner_at_least_as_fast(rows):
    for row in rows:
        pub = float(row["tflops_per_gpu"])
        pred = predict_row(row)
        assert pred.tflops_per_gpu == pytest.approx(pub, rel=0.15), (
            row["params_b"],
            pred.config.label(),
        )
        mine = plan_row(row, simulate_top=2)
        assert mine.step_time_s <= pred.step_time_s * 1.001, row["params_b"]


def test_70b_training_on_8_gpus_is_refused_with_the_numbers():
    # 70.6B parameters x 16 bytes of weights, gradients and Adam states = 1,129 GB, against
    # 8 x 78 GB: no mix of strategies trains it on one node, so the 8-GPU verdict is for serving.
    res = search(get_model("llama3-70b"), get_hardware("h100-sxm"), 8, 64)
    with pytest.raises(ValueError, match=r"1,129 GB .* 624 GB on all 8 GPUs; .* at least 15 GPUs"):
        _ = res.best


def test_70b_on_8_gpus_tensor_on_nvlink_shifts_to_pipeline_on_pcie():
    model = get_model("llama2-70b")
    sxm = plan_inference(model, get_hardware("h100-sxm"), 8, rate=1.0, latency_s=30)
    pcie = plan_inference(model, get_hardware("h100-pcie"), 8, rate=1.0, latency_s=30)
    assert sxm.best.strategy == "tensor"
    opt = {o.strategy: o for o in sxm.options}
    opt_p = {o.strategy: o for o in pcie.options}
    lead_sxm = opt["pipeline"].latency_s / opt["tensor"].latency_s
    lead_pcie = opt_p["pipeline"].latency_s / opt_p["tensor"].latency_s
    assert lead_pcie < lead_sxm  # tensor's lead over pipeline shrinks without NVLink
    assert opt_p["pipeline"].capacity_rps > opt_p["tensor"].capacity_rps


def test_training_verdict_moves_from_tensor_to_pipeline_without_nvlink():
    # without FSDP (which wins both: tests/test_plan_fsdp.py)
    model, kw = get_model("llama2-70b"), dict(simulate_top=4, dp_shards=["none", "zero1"])
    sxm = search(model, get_hardware("h100-sxm"), 64, 512, **kw).best.config
    pcie = search(model, get_hardware("h100-pcie"), 64, 512, **kw).best.config
    assert 1 < sxm.tp <= 8  # tensor parallel inside the NVLink node
    assert pcie.tp < sxm.tp and pcie.pp > sxm.pp


def test_cli_plan_json_and_given_config(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama2-7b",
                "--hardware",
                "a100-80gb",
                "--gpus",
                "16",
                "--global-batch",
                "64",
                "--seq-len",
                "2048",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    for key in (
        "dp",
        "tp",
        "pp",
        "schedule",
        "microbatch_size",
        "step_time_s",
        "tflops_per_gpu",
        "mfu",
        "bubble_fraction",
        "memory_gb_per_gpu",
        "alternatives",
    ):
        assert key in out
    assert out["dp"] * out["tp"] * out["pp"] == 16
    assert out["step_time_s"] <= min(a["step_time_s"] for a in out["alternatives"]) + 1e-12
    assert (
        main(
            [
                "plan",
                "--model",
                "llama2-7b",
                "--hardware",
                "a100-80gb",
                "--gpus",
                "16",
                "--global-batch",
                "64",
                "--dp",
                "2",
                "--tp",
                "4",
                "--pp",
                "2",
                "--microbatch-size",
                "1",
                "--schedule",
                "1f1b",
                "--json",
            ]
        )
        == 0
    )
    given = json.loads(capsys.readouterr().out)
    assert (given["dp"], given["tp"], given["pp"], given["schedule"]) == (2, 4, 2, "1f1b")
    assert given["step_time_s"] >= out["step_time_s"]
    assert given["schedule_costs"] is None  # 1F1B is a fixed pattern


def test_plan_given_zero_bubble_prints_the_costs_to_train_it_with(capsys):
    args = "plan --model llama3-8b --hardware h100-sxm --gpus 16 --global-batch 64 --seq-len 4096"
    args += " --dp 1 --tp 4 --pp 4 --microbatch-size 1 --schedule zb-v"
    assert main(args.split()) == 0
    out = capsys.readouterr().out
    given = out.split("\nGiven ")[1]
    assert "Its schedule is built for forward : input-backward : weight-backward = 1 :" in given
    assert "(plait train --schedule-costs 1," in given
    assert (
        main(
            [
                "plan",
                "--model",
                "llama2-7b",
                "--gpus",
                "16",
                "--global-batch",
                "64",
                "--dp",
                "3",
                "--tp",
                "4",
                "--pp",
                "2",
                "--microbatch-size",
                "1",
            ]
        )
        == 2
    )
    assert "--dp 3 x --tp 4 x --pp 2 = 24" in capsys.readouterr().err


def test_cli_plan_text_and_simulate(capsys, tmp_path):
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt3-175b",
                "--hardware",
                "a100-80gb",
                "--gpus",
                "256",
                "--global-batch",
                "512",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Verdict:" in text and "Not data parallel only: does not fit" in text
    png = tmp_path / "s.png"
    assert (
        main(
            [
                "simulate",
                "--schedule",
                "gpipe",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--json",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    sim = json.loads(capsys.readouterr().out)
    assert sim["bubble_fraction"] == pytest.approx(3 / 11)
    assert png.stat().st_size > 0
