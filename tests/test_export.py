"""Trained models leave plait: checkpoints record their model (plait.json), ``plait export``
writes any checkpoint (any mesh) as a Hugging Face directory that ``from_pretrained`` reloads
with the trained logits, fine-tuning starts from a directory's weights (and from an export
continues where the checkpoint left off), ``plait infer --checkpoint`` scores the trained model
with any model kind and strategy, and ``plait compare`` takes ``hf:`` models."""

import json
import shutil
from pathlib import Path

import hf_models
import pytest

from plait.cli import main
from plait.config import ParallelConfig
from plait.train import TrainConfig, train
from plait.train.store import write_manifest

pytest.importorskip("transformers")

TOL = 1e-5
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    text = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("test_*.py")))
    path.write_bytes(text[:200_000])
    return str(path)


def _train(model, ck, corpus, steps=3, **kw):
    return train(
        TrainConfig(
            model=model,
            steps=steps,
            seq_len=SEQ,
            data=corpus,
            checkpoint_dir=None if ck is None else str(ck),
            checkpoint_every=steps if ck is not None else 0,
            progress=False,
            **kw,
        )
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory, corpus):
    """A tiny Llama directory with weights, and a 3-step single-process checkpoint of it."""
    root = tmp_path_factory.mktemp("llama")
    d = hf_models.save("llama", root / "model")
    hist = _train(f"hf:{d}", root / "ck", corpus)
    return d, root / "ck", hist


def _trained(d, ck):
    """The trained model, built here from the checkpoint's full tensors (independently of
    plait.train.export): the directory's config, every parameter read by name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.train.checkpoint import latest_checkpoint, load_checkpoint

    step = Path(ck) if (Path(ck) / "plait.json").is_file() else latest_checkpoint(ck)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(d), attn_implementation="eager", dtype=torch.float32
    )
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {f"model.{n}": torch.empty(p.shape) for n, p in params.items()}
    load_checkpoint(step, state)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[f"model.{n}"])
    return model.eval()


def _batch(model_name, corpus, step=0, batch_size=8):
    from plait.data import dataset_for
    from plait.models import resolve_model

    return dataset_for(resolve_model(model_name), corpus, seed=0, seq_len=SEQ).batch(
        step, batch_size, SEQ
    )


def _logits(model, x):
    import torch

    with torch.no_grad():
        return model(x).logits


def _loss(model, x, y):
    import torch

    from plait.models.source import next_token_loss

    with torch.no_grad():
        return next_token_loss(model(x), y).item()


def _reload(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()


def _export_cli(capsys, *argv):
    code = main(["export", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line_error(capsys, argv, *match, command="export"):
    code = main([command, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"plait {command}: error:"), err
    for m in match:
        assert m in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ what a checkpoint records


def test_a_checkpoint_records_its_model(llama):
    d, ck, _ = llama
    from plait.train.checkpoint import checkpoint_meta, find_checkpoint

    step = find_checkpoint(ck)
    assert step.name == "step-00000003"
    meta = json.loads((step / "plait.json").read_text())
    assert meta == checkpoint_meta(step)
    assert meta["model"] == f"hf:{Path(d).resolve()}"
    assert meta["kind"] == "hf" and meta["n_layers"] == 4 and meta["dtype"] == "fp32"
    assert meta["mesh"] == {"dp": 1, "pp": 1, "tp": 1} and meta["step"] == 3
    assert not list(Path(ck).glob("*.partial"))


# ------------------------------------------------------------------ export


def test_export_reloads_with_the_trained_logits(llama, corpus, tmp_path, capsys):
    d, ck, _ = llama
    out = tmp_path / "export"
    code, stdout, err = _export_cli(capsys, "--checkpoint", str(ck), "--out", str(out))
    assert code == 0, err
    assert "exported" in stdout and str(out) in stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "generation_config.json").is_file()
    x, _ = _batch(f"hf:{d}", corpus)
    want = _logits(_trained(d, ck), x)
    got = _logits(_reload(out), x)
    assert (got - want).abs().max().item() <= TOL
    untrained = _logits(_reload(d), x)
    assert (untrained - want).abs().max().item() > 1e-3  # training changed the weights


def test_export_takes_a_step_directory_and_copies_the_tokenizer(tmp_path, corpus):
    """A directory with a tokenizer trains on its ids; the export carries its tokenizer files
    and generation config, and reloads with the same tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig

    from plait.train.export import export_hf

    d = Path(hf_models.save("llama", tmp_path / "tok-model", layers=2))
    _tokenizer().save_pretrained(d)
    GenerationConfig(max_new_tokens=7, bos_token_id=1, eos_token_id=2).save_pretrained(d)
    _train(f"hf:{d}", tmp_path / "ck", corpus, steps=2)
    step = tmp_path / "ck" / "step-00000002"
    out = export_hf(step, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    text = "hello plait, split the model"
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(
        d
    ).encode(text)
    x, _ = _batch(f"hf:{d}", corpus)
    assert (_logits(_reload(out), x) - _logits(_trained(d, step), x)).abs().max() <= TOL


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello plait, split the model " * 50, "def test(x): " * 50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_an_older_checkpoint_exports_with_model_named(tmp_path, corpus, capsys):
    """A checkpoint that does not record its model (save_checkpoint without it) needs --model;
    the layer count comes from the tensors."""
    d = hf_models.save("llama", tmp_path / "model", layers=4)
    _train(f"hf:{d}", tmp_path / "ck", corpus, steps=1, n_layers=2)
    step = tmp_path / "ck" / "step-00000001"
    manifest = json.loads((step / "plait.json").read_text())
    for key in ("model", "kind", "n_layers", "run", "params"):
        manifest.pop(key)
    write_manifest(step, manifest)
    _one_line_error(
        capsys,
        ["--checkpoint", str(step), "--out", str(tmp_path / "out")],
        "does not record its model",
        "--model",
    )
    code, _, err = _export_cli(
        capsys, "--checkpoint", str(step), "--out", str(tmp_path / "out"), "--model", f"hf:{d}"
    )
    assert code == 0, err
    reloaded = _reload(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 2
    x, _ = _batch(f"hf:{d}", corpus)
    want = _trained(tmp_path / "out", step)  # the 2-layer config, the checkpoint's tensors
    assert (_logits(reloaded, x) - _logits(want, x)).abs().max() <= TOL


def test_export_refusals_are_one_line(llama, tmp_path, corpus, capsys):
    d, ck, _ = llama
    out = str(tmp_path / "out")
    # no complete checkpoint: an empty directory, one holding only an unfinished save, none
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "empty"), "--out", out], "no complete")
    partial = tmp_path / "crashed" / "step-00000005.partial"
    shutil.copytree(ck / "step-00000003", partial)
    _one_line_error(
        capsys, ["--checkpoint", str(partial.parent), "--out", out], "no complete", ".partial"
    )
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "nope"), "--out", out], "no such")
    # a preset and a function's model have no Hugging Face class
    _train("tiny", tmp_path / "tiny-ck", corpus, steps=1)
    _one_line_error(
        capsys,
        ["--checkpoint", str(tmp_path / "tiny-ck"), "--out", out],
        "needs an hf: model",
        "'tiny' is a preset",
    )
    _train("user_models:mlp", tmp_path / "mlp-ck", None, steps=1)
    _one_line_error(
        capsys,
        ["--checkpoint", str(tmp_path / "mlp-ck"), "--out", out],
        "needs an hf: model",
        "function",
    )
    # tensors that do not match the model named: the first differing one is named
    qwen = hf_models.save("qwen2", tmp_path / "qwen2", weights=False)
    _one_line_error(
        capsys,
        ["--checkpoint", str(ck), "--out", out, "--model", f"hf:{qwen}"],
        "does not match",
        "'model.layers.0.self_attn.q_proj.bias' [32] is not in the checkpoint",
    )
    wide = tmp_path / "wide"
    cfg = hf_models.config("llama")
    cfg.intermediate_size = 96
    cfg.save_pretrained(wide)
    _one_line_error(
        capsys,
        ["--checkpoint", str(ck), "--out", out, "--model", f"hf:{wide}"],
        "'model.layers.0.mlp.gate_proj.weight' is [64, 32] in the checkpoint but [96, 32]",
    )
    assert not Path(out).exists()
    # and a checkpoint tensor the model has no place for
    from plait.train.export import check_params

    model = _trained(d, ck)
    del model.lm_head
    with pytest.raises(
        ValueError, match="parameter 'lm_head.weight' \\[256, 32\\] is not in the model"
    ):
        check_params(model, ck / "step-00000003")


# ------------------------------------------------------------------ fine-tuning


def test_fine_tuning_starts_from_the_directory_weights(llama, corpus):
    d, _, hist = llama
    x, y = _batch(f"hf:{d}", corpus)
    assert abs(hist[0]["loss"] - _loss(_reload(d), x, y)) <= TOL


def test_training_from_an_export_continues_where_the_checkpoint_left_off(llama, corpus, tmp_path):
    from plait.train.export import export_hf

    d, ck, hist = llama
    out = export_hf(ck, tmp_path / "export")
    again = _train(f"hf:{out}", None, corpus, steps=1)
    x, y = _batch(f"hf:{out}", corpus)
    trained = _loss(_trained(d, ck), x, y)
    assert abs(again[0]["loss"] - trained) <= TOL
    assert trained < hist[0]["loss"]  # the trained model does better on the first batch


# ------------------------------------------------------------------ infer --checkpoint


def _infer_losses(capsys, corpus, tmp_path, *argv):
    out = tmp_path / f"losses-{len(list(tmp_path.glob('losses-*')))}.jsonl"
    code = main(
        ["infer", "--data", corpus, "--seq-len", str(SEQ), "--limit", "12", "--batch-size", "3",
         "--no-progress", "--out", str(out), *argv]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


def _close(a, b):
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)


def test_infer_scores_the_trained_model(llama, corpus, tmp_path, capsys):
    from plait.train.export import export_hf

    d, ck, _ = llama
    trained = _infer_losses(capsys, corpus, tmp_path, "--model", f"hf:{d}", "--checkpoint", str(ck))
    untrained = _infer_losses(capsys, corpus, tmp_path, "--model", f"hf:{d}")
    assert sum(trained) / 12 < sum(untrained) / 12
    out = export_hf(ck, tmp_path / "export")
    _close(trained, _infer_losses(capsys, corpus, tmp_path, "--model", f"hf:{out}"))
    # the model the checkpoint records, when --model is left out
    _close(
        trained, _infer_losses(capsys, corpus, tmp_path, "--checkpoint", str(ck / "step-00000003"))
    )


def test_infer_with_a_preset_checkpoint(tmp_path, corpus, capsys):
    """Any model kind: a preset's checkpoint scores better than its initialisation."""
    _train("tiny", tmp_path / "ck", corpus, steps=10)
    trained = _infer_losses(
        capsys, corpus, tmp_path, "--model", "tiny", "--checkpoint", str(tmp_path / "ck")
    )
    untrained = _infer_losses(capsys, corpus, tmp_path, "--model", "tiny")
    assert sum(trained) < sum(untrained)


def test_infer_refusals_are_one_line(llama, tmp_path, corpus, capsys):
    d, ck, _ = llama
    base = ["--data", corpus, "--no-progress"]
    _one_line_error(
        capsys, [*base, "--checkpoint", str(tmp_path)], "no complete checkpoint", command="infer"
    )
    _one_line_error(
        capsys,
        [*base, "--model", "tiny", "--checkpoint", str(ck)],
        "does not match model 'tiny'",
        command="infer",
    )
    _one_line_error(
        capsys, [*base, "--model", "user_models:mlp"], "not a language model", command="infer"
    )
    _one_line_error(
        capsys,
        [*base, "--model", f"hf:{d}", "--strategy", "tensor", "--workers", "4"],
        "tp=4",
        command="infer",
    )
    _one_line_error(
        capsys,
        [*base, "--model", f"hf:{d}", "--strategy", "pipeline", "--workers", "8"],
        "cannot split 4 blocks into 8 stages",
        command="infer",
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["pipeline", "tensor", "task"])
def test_every_infer_strategy_scores_the_checkpoint_alike(
    llama, corpus, tmp_path, capsys, strategy
):
    d, ck, _ = llama
    argv = ["--model", f"hf:{d}", "--checkpoint", str(ck)]
    single = _infer_losses(capsys, corpus, tmp_path, *argv)
    _close(
        single,
        _infer_losses(capsys, corpus, tmp_path, *argv, "--strategy", strategy, "--workers", "2"),
    )


# ------------------------------------------------------------------ any mesh


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_pp2_tp2_checkpoint_exports_with_the_trained_logits(family, corpus, tmp_path, capsys):
    d = hf_models.save(family, tmp_path / "model")
    ck = tmp_path / "ck"
    train(
        TrainConfig(
            model=f"hf:{d}",
            steps=5,
            seq_len=SEQ,
            data=corpus,
            parallel=ParallelConfig(pp=2, tp=2),
            checkpoint_dir=str(ck),
            checkpoint_every=5,
            progress=False,
        )
    )
    meta = json.loads((ck / "step-00000005" / "plait.json").read_text())
    assert meta["mesh"] == {"dp": 1, "pp": 2, "tp": 2}
    out = tmp_path / "export"
    code, _, err = _export_cli(capsys, "--checkpoint", str(ck), "--out", str(out))
    assert code == 0, err
    reloaded = _reload(out)
    if family == "gpt2":  # tied input and output embeddings stay one tensor
        assert reloaded.config.tie_word_embeddings
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    x, _ = _batch(f"hf:{d}", corpus)
    want = _logits(_trained(d, ck), x)
    assert (_logits(reloaded, x) - want).abs().max().item() <= TOL
    assert (_logits(_reload(d), x) - want).abs().max().item() > 1e-3


# ------------------------------------------------------------------ compare and demo


def test_compare_candidates_of_a_hugging_face_model(llama):
    from plait.compare import CompareConfig, _spec, infer_candidates, train_candidates

    d = llama[0]
    # 4 layers, 4 heads and 2 key/value heads: tp in 1, 2; pp up to 4
    names = {(s.dp, s.pp, s.tp) for _, s in train_candidates(f"hf:{d}", 4, seq_len=SEQ)}
    assert names == {(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2)}
    got = [n for n, _ in infer_candidates(f"hf:{d}", 4)]
    # tensor alone would be tp=4, more than the 2 key/value heads
    assert got == ["single", "task", "pipeline", "task,pipeline", "task,tensor", "pipeline,tensor"]
    spec = _spec(CompareConfig(model=f"hf:{d}", seq_len=SEQ))
    assert spec.layers == 4 and spec.seq_len == SEQ and spec.kv_heads == 2


def test_compare_and_demo_refuse_bad_models_in_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["--model", "nosuch"], "unknown model 'nosuch'", command="compare")
    _one_line_error(
        capsys, ["--model", "hf:/nonexistent/x", "--out-dir", str(tmp_path)], "no such directory",
        command="demo",
    )  # fmt: skip


@pytest.mark.slow
def test_compare_measures_a_hugging_face_model(llama, tmp_path, capsys):
    d = llama[0]
    argv = ["compare", "--model", f"hf:{d}", "--workers", "2", "--mode", "infer",
            "--sequences", "8", "--seq-len", str(SEQ), "--out-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in report["rows"]}
    assert sorted(rows) == ["pipeline", "single", "task", "tensor"]
    for r in rows.values():
        assert r["error"] is None, r
        assert r["measured"]["sequences_per_s"] > 0 and r["predicted"]["sequences_per_s"] > 0
