"""The partitioner owns the layer split: the planner costs exactly the stages the runtime builds."""

import pytest

from plait.config import ParallelConfig
from plait.models import Transformer, get_config
from plait.pipeline import partition, split_blocks
from plait.plan import CostModel, get_hardware, get_model

HW = get_hardware("a100-80gb")


def _planner_counts(layers: int, stages: int, balance: str) -> list[int]:
    spec = get_model("tiny", layers=layers)
    cfg = ParallelConfig(pp=stages, balance=balance, dtype="bf16")
    return CostModel(spec, HW, cfg).layers


@pytest.mark.parametrize("balance", ["layers", "params"])
def test_planner_splits_layers_as_the_partitioner_cuts_them(balance):
    for layers in range(1, 65):
        model = Transformer(get_config("tiny", n_layers=layers), seed=0)
        for stages in range(1, min(layers, 16) + 1):
            built = [len(s.block_indices) for s in partition(model, stages, balance)]
            assert _planner_counts(layers, stages, balance) == built, (layers, stages)


def test_the_rule_in_numbers():
    # spare layers go to the middle stages first, then to the first
    assert split_blocks(7, 4) == [2, 2, 2, 1]
    assert split_blocks(11, 4) == [3, 3, 3, 2]
    assert split_blocks(10, 4) == [2, 3, 3, 2]
    # heavy edges get fewer blocks when balancing parameters
    assert split_blocks(4, 2, "params", [9, 1, 1, 1, 1, 9]) == [2, 2]
    assert split_blocks(4, 3, "params", [6, 1, 1, 1, 1, 6]) == [0, 4, 0]
    with pytest.raises(ValueError, match="cannot split 3 blocks into 4 stages"):
        split_blocks(3, 4)
    with pytest.raises(ValueError, match="balance='params' needs one cost per unit"):
        split_blocks(3, 2, "params")


def test_planner_places_stages_where_the_generator_does():
    from plait.pipeline import build_schedule

    for schedule in ("1f1b", "interleaved-1f1b", "zb-v"):
        cfg = ParallelConfig(pp=4, schedule=schedule, dtype="bf16")
        cm = CostModel(get_model("tiny", layers=8), HW, cfg)
        assert cm.stage_rank == build_schedule(schedule, 4, 4).stage_to_rank
