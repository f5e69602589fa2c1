import itertools

import pytest
import workers

from plait import Mesh, MeshShape, launch


def brute_force(dp, pp, tp):
    """Enumerate coordinates in (dp, pp, tp) order with tp fastest: rank = position."""
    coords = list(itertools.product(range(dp), range(pp), range(tp)))
    return {r: dict(zip(("dp", "pp", "tp"), c)) for r, c in enumerate(coords)}


def expected_group(table, rank, axis):
    mine = table[rank]
    return sorted(
        r for r, c in table.items() if all(c[a] == mine[a] for a in ("dp", "pp", "tp") if a != axis)
    )


@pytest.mark.parametrize("shape", MeshShape.factorisations(8), ids=repr)
def test_every_factorisation_of_8_matches_brute_force(shape):
    table = brute_force(shape.dp, shape.pp, shape.tp)
    assert shape.world_size == 8
    for rank, coords in table.items():
        assert shape.coords(rank) == coords
        assert shape.rank(**coords) == rank
        for axis in ("dp", "pp", "tp"):
            assert shape.group_ranks(axis, rank) == expected_group(table, rank, axis)
    for axis in ("dp", "pp", "tp"):
        groups = shape.all_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(8))  # a partition
        assert all(len(g) == shape.size(axis) for g in groups)


def test_factorisations_are_complete():
    shapes = {(s.dp, s.pp, s.tp) for s in MeshShape.factorisations(8)}
    brute = {
        (a, b, c) for a in range(1, 9) for b in range(1, 9) for c in range(1, 9) if a * b * c == 8
    }
    assert shapes == brute and len(shapes) == 10


def test_tp_is_innermost():
    s = MeshShape(dp=2, pp=2, tp=2)
    assert s.group_ranks("tp", 0) == [0, 1]
    assert s.group_ranks("pp", 0) == [0, 2]
    assert s.group_ranks("dp", 0) == [0, 4]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_sizes_are_named(bad):
    with pytest.raises(ValueError, match=r"mesh axis dp must be a positive integer, got"):
        MeshShape(dp=bad)


def test_world_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="needs 4 ranks but the world has 1"):
        Mesh(dp=2, tp=2)


def test_single_process_mesh():
    m = Mesh()
    assert m.coords == {"dp": 0, "pp": 0, "tp": 0}
    assert m.group("tp") is None and m.pp_prev is None and m.pp_next is None
    with pytest.raises(ValueError, match="unknown mesh axis 'xx'"):
        m.group("xx")


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 2, 1), (2, 1, 2), (1, 4, 1)])
def test_process_groups_on_real_workers(shape):
    dp, pp, tp = shape
    results = launch(workers.mesh_groups, dp * pp * tp, dp, pp, tp)
    layout = MeshShape(dp, pp, tp)
    table = brute_force(dp, pp, tp)
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["coords"] == table[rank]
        for axis in ("dp", "pp", "tp"):
            assert res["groups"][axis] == expected_group(table, rank, axis)
        stage = table[rank]["pp"]
        assert res["prev"] == (
            layout.rank(table[rank]["dp"], stage - 1, table[rank]["tp"]) if stage > 0 else None
        )
        assert res["next"] == (
            layout.rank(table[rank]["dp"], stage + 1, table[rank]["tp"]) if stage < pp - 1 else None
        )


@pytest.mark.slow
def test_mesh_on_8_workers():
    results = launch(workers.mesh_groups, 8, 2, 2, 2)
    table = brute_force(2, 2, 2)
    for rank, res in enumerate(results):
        for axis in ("dp", "pp", "tp"):
            assert res["groups"][axis] == expected_group(table, rank, axis)
