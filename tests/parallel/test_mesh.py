"""Mesh: coordinates, groups and errors, in one process and in 4 gloo processes."""
import pytest

from fastllm.parallel.mesh import Mesh, MeshError
from tests.parallel.harness import run_distributed


def test_single_process_mesh_has_no_groups():
    m = Mesh()
    assert (m.dp, m.pp, m.tp, m.rank, m.world_size) == (1, 1, 1, 0, 1)
    assert all(m.group(d) is None for d in ("dp", "pp", "tp", "tied", "world"))
    assert m.is_first_stage and m.is_last_stage


def test_layout_not_dividing_world_is_an_error():
    with pytest.raises(MeshError, match="does not equal the world size 1"):
        Mesh(dp=2)
    with pytest.raises(MeshError, match="parallel.tp must be >= 1"):
        Mesh(tp=0)


def _grid(rank, world, dp, pp, tp):
    m = Mesh(dp, pp, tp)
    return {d: m.peers(d) for d in ("dp", "pp", "tp", "tied")}, (m.dp_rank, m.pp_rank, m.tp_rank)


def test_four_process_grid_tp_fastest():
    out = run_distributed(_grid, 4, 2, 1, 2)
    assert [c for _, c in out] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert out[0][0]["tp"] == [0, 1] and out[0][0]["dp"] == [0, 2] and out[3][0]["dp"] == [1, 3]
    out = run_distributed(_grid, 4, 1, 2, 2)
    assert out[1][0]["pp"] == [1, 3] and out[1][0]["tied"] == [1, 3] and out[2][0]["tp"] == [2, 3]


def _bad(rank, world):
    try:
        Mesh(dp=3)
    except MeshError as e:
        return str(e)
    return None


def test_bad_layout_errors_on_every_rank():
    msgs = run_distributed(_bad, 2)
    assert all(m and "does not equal the world size 2" in m for m in msgs)
