"""One parallel configuration: every command accepts the same schedule names with the same
defaults, bad settings are named, and parsing arguments never imports torch."""

import subprocess
import sys

import pytest

from plait.cli import build_parser
from plait.config import (
    SCHEDULE_SPECS,
    SCHEDULES,
    ParallelConfig,
    parallel_from_args,
    resolve_schedule,
    schedule_names,
)
from plait.pipeline import build_schedule

# How each command names a pipeline of 4 ranks; the flags after it are the same for all.
COMMANDS = {
    "train": ["train", "--pp", "4"],
    "plan": ["plan", "--pp", "4"],
    "simulate": ["simulate", "--stages", "4"],
    "compare": ["compare"],
}


def _parsed(command: str, *flags: str) -> ParallelConfig:
    args = build_parser().parse_args([*COMMANDS[command], *flags])
    if command == "simulate":
        return ParallelConfig(
            pp=args.stages,
            schedule=args.schedule,
            virtual=args.virtual,
            num_microbatches=args.num_microbatches,
        )
    if command == "compare":
        return ParallelConfig(pp=4, schedule=args.schedule)
    return parallel_from_args(args)


@pytest.mark.parametrize("name", schedule_names())
def test_every_schedule_name_is_accepted_by_every_command_with_the_same_defaults(name):
    got = {command: _parsed(command, "--schedule", name) for command in COMMANDS}
    canonical = resolve_schedule(name)
    for command, cfg in got.items():
        assert cfg.schedule == canonical, command
        assert cfg.virtual == SCHEDULE_SPECS[canonical].default_virtual, command
    # and the generator builds the same schedule under every name
    assert build_schedule(name, 4, 8).actions == build_schedule(canonical, 4, 8).actions


def test_train_lists_the_valid_schedules_for_a_bad_one():
    res = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--schedule", "nope"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "invalid choice: 'nope'" in res.stderr
    for name in schedule_names():
        assert f"'{name}'" in res.stderr


def test_parsing_arguments_does_not_import_torch():
    # Every command's parser, a full parse of each, and the help text: torch stays unloaded.
    code = (
        "import sys, contextlib, io\n"
        "from plait.cli import build_parser\n"
        "p = build_parser()\n"
        "for argv in (['train', '--pp', '2', '--schedule', 'zbv'], ['plan', '--gpus', '8'],\n"
        "             ['simulate', '--stages', '2'], ['compare'], ['infer'], ['demo']):\n"
        "    p.parse_args(argv)\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for argv in (['--help'], ['train', '--help']):\n"
        "        try:\n"
        "            p.parse_args(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "from plait.train import TrainConfig\n"
        "from plait.config import ParallelConfig\n"
        "TrainConfig(steps=3, parallel=ParallelConfig(dp=2)).validate()\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad[:5]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_an_argument_error_is_answered_before_torch_loads():
    code = (
        "import sys\n"
        "from plait.cli import main\n"
        "rc = main(['train', '--steps', '0'])\n"
        "assert rc == 2 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--steps must be an integer >= 1, got 0" in res.stderr


def test_defaults_are_decided_once():
    assert ParallelConfig(pp=4).num_microbatches == 4
    assert ParallelConfig(pp=2, schedule="interleaved").virtual == 2
    assert ParallelConfig(pp=2, schedule="zb-v").virtual == 2
    assert ParallelConfig(pp=2, schedule="interleaved-1f1b", virtual=4).num_stages == 8
    # without a pipeline there is no schedule and one chunk
    one = ParallelConfig(schedule="zb-v")
    assert (one.schedule, one.virtual) == ("none", 1)
    assert ParallelConfig(dtype="float32").dtype == "fp32"
    assert ParallelConfig(tp=1, sequence_parallel=True).sequence_parallel is False
    for name in SCHEDULES:  # the generator's default is the config's
        assert build_schedule(name, 2, 4).virtual == ParallelConfig(pp=2, schedule=name).virtual


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"pp": 2, "schedule": "fast"}, "unknown schedule 'fast'; valid schedules are"),
        ({"pp": 2, "schedule": "zb-v", "virtual": 3}, "'zb-v' has virtual=2 chunks per rank"),
        ({"virtual": 3}, "virtual=3 needs a pipeline (pp > 1)"),
        ({"dp": 0}, "dp must be a positive integer, got 0"),
        ({"pp": 2, "num_microbatches": 0}, "num_microbatches must be a positive integer"),
        ({"recompute": "some"}, "recompute 'some' is not one of"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'; valid dtypes are"),
        ({"balance": "flops"}, "balance 'flops' is not one of"),
        ({"pp": 2, "schedule_costs": (1, 0, 1)}, "costs must be three positive numbers"),
        ({"pp": 2, "schedule": "none"}, "pp=2 needs a pipeline schedule"),
    ],
)
def test_bad_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=_escape(message)):
        ParallelConfig(**kw)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
