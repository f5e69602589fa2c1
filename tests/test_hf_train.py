"""`plait train --model hf:DIR` on each covered family: every mesh and schedule reproduces the
single-process run over 20 steps (float32, the CLI's defaults), checkpoints export to the
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


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def family(request, tmp_path_factory):
    d = hf_models.save(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, d


def _losses(d, **kw):
    parallel = ParallelConfig(**kw)
    return [
        r["loss"]
        for r in train(TrainConfig(model=f"hf:{d}", steps=20, parallel=parallel, progress=False))
    ]


@pytest.fixture(scope="module")
def single(family):
    return _losses(family[1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}x{m[2]}-{m[3]}")
def test_every_mesh_matches_one_process(family, single, mesh):
    dp, pp, tp, schedule = mesh
    got = _losses(family[1], dp=dp, pp=pp, tp=tp, schedule=schedule)
    assert len(got) == len(single) == 20
    for step, (a, b) in enumerate(zip(got, single)):
        assert abs(a - b) <= RTOL * abs(b), (family[0], mesh, step, a, b)


@pytest.mark.slow
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
