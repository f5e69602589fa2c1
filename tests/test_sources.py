"""One syntax for naming a model: presets, hf:DIR, PACKAGE.MODULE:FUNCTION (nothing downloaded)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from plait.data import ByteDataset, TokenDataset, UserBatches, dataset_for  # noqa: E402
from plait.models import ModelSource, Transformer, UserModel, get_config, resolve_model  # noqa: E402
from plait.plan.model_spec import from_hf_config  # noqa: E402

VOCAB = 300
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


# ------------------------------------------------------------------ functions named in tests
def tiny_lm() -> nn.Module:
    """A bare module: a language model fed token ids."""
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))


def not_a_model():
    return 42


NOT_CALLABLE = 7


# ------------------------------------------------------------------ helpers
def _configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    return {
        "llama": LlamaConfig(**SMALL),
        "llama-bias-tied": LlamaConfig(
            **SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
        "qwen2": Qwen2Config(**SMALL),
        "qwen2-tied": Qwen2Config(**SMALL, tie_word_embeddings=True),
        "mistral": MistralConfig(**SMALL),
        "mistral-head-dim": MistralConfig(**SMALL, head_dim=16),
        "phi3": Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    }


def _save(tmp_path, name="llama", weights=False, tokenizer=False, seed=0):
    from transformers import AutoModelForCausalLM

    d = tmp_path / name
    config = _configs()[name]
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
    else:
        config.save_pretrained(d)
    if tokenizer:
        _tokenizer().save_pretrained(d)
    return d


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 10, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["hello plait, split the model " * 50, "the quick brown fox " * 50], trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _one_line_error(name, *match):
    with pytest.raises(ValueError) as info:
        resolve_model(name)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


# ------------------------------------------------------------------ each syntax
def test_a_preset_builds_the_reference_transformer():
    src = resolve_model("tiny")
    assert isinstance(src, ModelSource) and src.kind == "preset" and src.name == "tiny"
    assert (src.vocab_size, src.max_seq_len, src.n_layers) == (256, 128, 2)
    assert src.is_language_model and not src.has_weights
    model = src.build(seed=3)
    assert isinstance(model, Transformer)
    assert _equal_state(model, Transformer(get_config("tiny"), seed=3))
    assert len(src.build(n_layers=3).blocks) == 3
    assert src.spec().num_parameters() == sum(p.numel() for p in model.parameters())
    assert resolve_model("tiny", hidden=32).build().config.hidden == 32
    with pytest.raises(ValueError, match="preset fields"):
        resolve_model("tiny", width=3)


def test_an_hf_directory_with_weights_builds_the_saved_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    d = _save(tmp_path, weights=True, seed=7)
    src = resolve_model(f"hf:{d}")
    assert src.kind == "hf" and src.has_weights and src.name == f"hf:{d}"
    assert (src.vocab_size, src.max_seq_len, src.n_layers) == (VOCAB, 64, 2)
    saved = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    built = src.build(seed=0)
    assert built.config._attn_implementation == "eager" and built.training
    assert all(p.dtype == torch.float32 for p in built.parameters())
    assert _equal_state(built, saved)
    assert _equal_state(src.build(seed=1), saved)  # the weights, not the seed
    short = src.build(n_layers=1)
    assert len(short.model.layers) == 1
    assert short.model.layers[0].mlp.up_proj.weight.equal(saved.model.layers[0].mlp.up_proj.weight)


def test_an_hf_config_without_weights_builds_from_the_seed(tmp_path):
    src = resolve_model(f"hf:{_save(tmp_path)}")
    assert not src.has_weights
    before = torch.random.get_rng_state()
    a, b, c = src.build(seed=0), src.build(seed=0), src.build(seed=1)
    assert torch.random.get_rng_state().equal(before)  # the global RNG is left alone
    assert _equal_state(a, b)
    assert not _equal_state(a, c)
    assert type(a).__name__ == "LlamaForCausalLM"
    assert len(src.build(n_layers=3).model.layers) == 3
    assert src.hf_config().num_hidden_layers == 2


def test_gpt2_layer_override_uses_n_layer(tmp_path):
    src = resolve_model(f"hf:{_save(tmp_path, 'gpt2')}")
    assert (src.n_layers, src.max_seq_len) == (2, 64)
    assert len(src.build(n_layers=1).transformer.h) == 1


def test_a_function_returning_a_module_is_a_language_model():
    src = resolve_model("test_sources:tiny_lm")
    assert src.kind == "function" and src.is_language_model
    assert src.vocab_size == VOCAB and src.max_seq_len is None
    a, b, c = src.build(seed=0), src.build(seed=0), src.build(seed=1)
    assert _equal_state(a, b) and not _equal_state(a, c)
    with pytest.raises(ValueError, match="n_layers"):
        src.build(n_layers=2)
    with pytest.raises(ValueError, match="needs a transformer's shape"):
        src.spec()
    x = torch.randint(0, VOCAB, (2, 8))
    assert src.loss(a(x), x).item() > 0
    with pytest.raises(ValueError, match="dataset"):
        src.batch(0, 2)


@pytest.mark.parametrize("fn", ["mlp", "cnn"])
def test_user_models_are_deterministic_and_train(fn):
    src = resolve_model(f"user_models:{fn}")
    assert src.kind == "function" and not src.is_language_model
    a, b, c = src.build(seed=0), src.build(seed=0), src.build(seed=1)
    assert isinstance(a, nn.Sequential)
    assert _equal_state(a, b) and not _equal_state(a, c)
    x, y = src.batch(3, 8, seed=5)
    x2, y2 = src.batch(3, 8, seed=5)
    assert x.equal(x2) and y.equal(y2)
    assert not x.equal(src.batch(4, 8, seed=5)[0])
    assert not x.equal(src.batch(3, 8, seed=6)[0])
    loss = src.loss(a(x), y)
    assert loss.shape == () and torch.isclose(loss, F.cross_entropy(a(x), y))
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    first = None
    for step in range(30):
        xb, yb = src.batch(step, 32, seed=0)
        loss = src.loss(a(xb), yb)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    ds = dataset_for(src, None, seed=5)
    assert isinstance(ds, UserBatches) and ds.batch(3, 8)[0].equal(x)
    with pytest.raises(ValueError, match="no --data"):
        dataset_for(src, "corpus.txt")
    with pytest.raises(ValueError, match="no tokenizer"):
        src.tokenizer()


# ------------------------------------------------------------------ errors
def test_errors_are_one_line_and_name_the_value(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    _one_line_error("hf:./nope", "hf:./nope: no such directory")
    _one_line_error(f"hf:{tmp_path}/empty", f"hf:{tmp_path}/empty", "has no config.json")
    _one_line_error(f"hf:{tmp_path}/file.txt", "not a directory")
    _one_line_error(f"hf:{tmp_path}/bad", "config.json is not readable")
    msg = _one_line_error("huge", "'huge'", "tiny", "small", "hf:DIR", "PACKAGE.MODULE:FUNCTION")
    assert "unknown model" in msg
    _one_line_error("no_such_pkg.models:build", "no_such_pkg.models:build", "cannot be imported")
    _one_line_error("test_sources:missing", "test_sources:missing", "no function 'missing'")
    _one_line_error("test_sources:NOT_CALLABLE", "not a function")
    _one_line_error("test_sources:not_a_model", "returned int", "nn.Module", "UserModel")
    _one_line_error("a b:c", "not PACKAGE.MODULE:FUNCTION")


# ------------------------------------------------------------------ loss, tokenizer, data
def test_loss_takes_logits_or_an_hf_output(tmp_path):
    src = resolve_model(f"hf:{_save(tmp_path)}")
    model = src.build()
    x = torch.randint(0, VOCAB, (2, 10))
    out = model(x)
    want = F.cross_entropy(out.logits.reshape(-1, VOCAB), x.reshape(-1))
    assert src.loss(out, x).equal(want)
    assert src.loss(out.logits, x).equal(want)
    assert resolve_model("tiny").loss(out.logits, x).equal(want)


def test_tokenizer_comes_from_the_directory_or_is_bytes(tmp_path):
    with_tok = resolve_model(f"hf:{_save(tmp_path, tokenizer=True)}")
    tok = with_tok.tokenizer()
    ids = tok.encode("hello plait, the quick fox")
    assert len(ids) < len("hello plait, the quick fox")  # merges, not bytes
    assert max(ids) < VOCAB and tok.decode(ids) == "hello plait, the quick fox"
    plain = resolve_model(f"hf:{_save(tmp_path, 'qwen2')}").tokenizer()
    assert plain.encode("hé") == list("hé".encode()) and plain.decode(plain.encode("hé")) == "hé"
    assert resolve_model("tiny").tokenizer().vocab_size == 256
    small_vocab = _configs()["llama"]
    small_vocab.vocab_size = 100
    small_vocab.save_pretrained(tmp_path / "v100")
    with pytest.raises(ValueError, match="vocab_size=100 is smaller than the 256"):
        resolve_model(f"hf:{tmp_path / 'v100'}").tokenizer()


def test_dataset_for_picks_bytes_or_tokens(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello plait, split the model; the quick brown fox. " * 40)
    tiny = dataset_for(resolve_model("tiny"), corpus, seed=1)
    assert type(tiny) is ByteDataset and tiny.unit == "bytes"
    assert tiny.batch(2, 4, 16)[0].equal(ByteDataset.from_path(corpus, seed=1).batch(2, 4, 16)[0])
    src = resolve_model(f"hf:{_save(tmp_path, tokenizer=True)}")
    ds = dataset_for(src, corpus, seed=1, seq_len=16)
    assert type(ds) is TokenDataset and len(ds) < corpus.stat().st_size
    x, y = ds.batch(2, 4, 16)
    assert x.dtype == torch.long and x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert x.equal(dataset_for(src, corpus, seed=1).batch(2, 4, 16)[0])
    assert not x.equal(dataset_for(src, corpus, seed=2).batch(2, 4, 16)[0])
    assert not x.equal(ds.batch(3, 4, 16)[0])
    assert int(x.max()) < VOCAB
    seqs = ds.sequences(16, limit=3)
    assert seqs.shape == (3, 17) and seqs[0].equal(ds.tokens[:17].long())
    assert src.tokenizer().decode(seqs[0].tolist()) in corpus.read_text()
    short = tmp_path / "short.txt"
    short.write_text("hello plait")
    with pytest.raises(ValueError, match="seq_len=64 needs at least 65") as info:
        dataset_for(src, short, seq_len=64)
    assert "\n" not in str(info.value) and "short.txt" in str(info.value)
    with pytest.raises(ValueError, match="bytes"):
        dataset_for("tiny", short, seq_len=64)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenDataset([1, 2, 300], vocab_size=VOCAB)


# ------------------------------------------------------------------ the planner's spec
@pytest.mark.parametrize("name", list(_configs()))
def test_spec_from_hf_config_counts_the_parameters(name):
    from transformers import AutoModelForCausalLM

    config = _configs()[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    spec = from_hf_config(config)
    assert spec.layers == 2 and spec.vocab == VOCAB
    assert abs(spec.num_parameters() / model.num_parameters() - 1) < 0.005, (
        spec.num_parameters(),
        model.num_parameters(),
    )
    assert from_hf_config(config.to_dict()).num_parameters() == spec.num_parameters()


def test_spec_of_an_hf_directory_and_its_families(tmp_path):
    d = _save(tmp_path, "gpt2")
    spec = resolve_model(f"hf:{d}").spec()
    assert (
        spec.name == f"hf:{d}" and spec.pos_embedding == 64 and spec.bias and spec.tied_embeddings
    )
    assert not spec.gated_mlp and spec.ffn == 128
    assert from_hf_config(d).num_parameters() == spec.num_parameters()
    qwen = from_hf_config(_configs()["qwen2"])
    assert qwen.qkv_bias and not qwen.out_bias and not qwen.mlp_bias and qwen.kv_heads == 2
    assert resolve_model(f"hf:{d}").spec(n_layers=1).layers == 1


def test_plait_plan_takes_an_hf_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from plait.cli import main

    d = _save(tmp_path, "qwen2", weights=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--model", f"hf:{d}", "--hardware", "h100-sxm", "--gpus", "2", "--json"])
    assert rc == 0
    res = json.loads(out.getvalue())
    n = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).num_parameters()
    assert res["model"] == f"hf:{d}" and res["seq_len"] == 64
    assert abs(res["parameters"] / n - 1) < 0.005
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["plan", "--model", "hf:./nope"]) == 2
    assert "hf:./nope: no such directory" in err.getvalue()


def test_naming_a_model_imports_no_torch(tmp_path):
    d = _save(tmp_path)
    code = (
        "import sys, plait.models\n"
        "from plait.models import resolve_model, ModelSource, UserModel\n"
        f"s = resolve_model('hf:{d}'); t = resolve_model('small')\n"
        "print(s.vocab_size, s.max_seq_len, s.has_weights, t.vocab_size)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(VOCAB), "64", "False", "256"]


def test_user_model_checks_what_it_holds():
    with pytest.raises(ValueError, match="must be a torch.nn.Module, got int"):
        UserModel(3)
    with pytest.raises(ValueError, match="UserModel.loss must be callable"):
        UserModel(nn.Linear(2, 2), loss="mse")
    assert UserModel(nn.Linear(2, 2)).is_language_model
    assert not UserModel(nn.Linear(2, 2), batch=lambda s, b, seed: (None, None)).is_language_model


def test_a_source_pickles_without_its_built_model():
    import pickle

    src = resolve_model("user_models:mlp")
    back = pickle.loads(pickle.dumps(src))
    assert back == src and back._probe is None
    assert _equal_state(back.build(seed=2), src.build(seed=2))
