"""`plait train --model hf:DIR` on each covered family: every mesh and schedule (on llama; the
layout-dependent ones on the others) reproduces the single-process run over 20 steps (float32, the CLI's defaults), checkpoints export to the
Hugging Face format, and training can start from a Hugging Face directory's weights."""

import subprocess
import sys

import hf_models
import pytest

from plait.config import ParallelConfig
from plait.train import TrainConfig, train

pytest.importorskip("transformers")

RTOL = 1e-4
MESHES = [
    *[(1, 2, 1, s) for s in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")],
    (1, 1, 2, "1f1b"),
    (2, 1, 1, "1f1b"),
    (1, 2, 2, "1f1b"),
]
# Schedules and data parallelism see a model only through its layout (plait's partitioner):
# every mesh runs on llama; each other family runs the meshes that touch what differs between
# layouts (stage cuts, a V that puts the first and last stage on one rank -- gpt2's tied
# embedding --, tensor-parallel plans, both together).
LAYOUT_MESHES = [(1, 2, 1, "1f1b"), (1, 2, 1, "zb-v"), (1, 1, 2, "1f1b"), (1, 2, 2, "1f1b")]
CASES = [(f, m) for f in hf_models.FAMILIES for m in (MESHES if f == "llama" else LAYOUT_MESHES)]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    d = hf_models.save(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, d


def _losses(d, **kw):
    parallel = ParallelConfig(**kw)
    return [
        r["loss"]
        for r in train(TrainConfig(model=f"hf:{d}", steps=20, parallel=parallel, progress=False))
    ]


_SINGLE: dict[str, list[float]] = {}  # one-process losses per family (weights from the seed)


@pytest.fixture(scope="module")
def single(family):
    if family[0] not in _SINGLE:
        _SINGLE[family[0]] = _losses(family[1])
    return _SINGLE[family[0]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, mesh",
    CASES,
    indirect=["family"],
    ids=[f"{f}-{m[0]}x{m[1]}x{m[2]}-{m[3]}" for f, m in CASES],
)
def test_every_mesh_matches_one_process(family, single, mesh):
    dp, pp, tp, schedule = mesh
    got = _losses(family[1], dp=dp, pp=pp, tp=tp, schedule=schedule)
    assert len(got) == len(single) == 20
    for step, (a, b) in enumerate(zip(got, single)):
        assert abs(a - b) <= RTOL * abs(b), (family[0], mesh, step, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("family", hf_models.FAMILIES, indirect=True)
def test_the_command_line_trains_a_hugging_face_directory(family, single):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "--model",
            f"hf:{family[1]}",
            "--steps",
            "20",
            "--pp",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"loss {single[0]:.4f} -> {single[-1]:.4f}" in res.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "user_models:odd", "--pp", "2"], "cannot cut _Odd into pipeline stages"),
        (["--tp", "4"], "tp=4 does not divide num_key_value_heads=2"),
        (["--model", "hf:/nonexistent/dir"], "hf:/nonexistent/dir: no such directory"),
    ],
)
def test_bad_input_is_one_line_before_workers_start(tmp_path, flags, message):
    d = hf_models.save("llama", tmp_path / "llama", weights=False)
    res = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--model", f"hf:{d}", *flags],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("plait train: error")]
    assert len(lines) == 1 and message in lines[0], res.stderr[-1500:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_readme_custom_loop_runs(tmp_path):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("### Your own model", 1)[1].split("\n### ", 1)[0]
    make, loop = re.findall(r"```python\n(.*?)```", section, re.S)
    for name, code in (("make_llama.py", make), ("custom_loop.py", loop)):
        (tmp_path / name).write_text(code)
    for name in ("make_llama.py", "custom_loop.py"):
        res = subprocess.run(
            [sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-2000:]
    assert 0 < float(res.stdout.strip().splitlines()[-1]) < 5.5  # it trained
