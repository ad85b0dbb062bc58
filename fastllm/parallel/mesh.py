"""The rank grid: dp x pp x tp with tp fastest-varying; every process group is built here, once.

Invariants:
- rank = (dp_rank * pp + pp_rank) * tp + tp_rank. Tensor-parallel peers are adjacent ranks (same node first),
  pipeline peers are tp apart, data-parallel peers tp * pp apart.
- Every rank calls `dist.new_group` for every group of every dimension in the same order (a torch.distributed
  requirement), and keeps the ones it belongs to. A dimension of size 1 gets group None.
- `tied_group`: the first and last pipeline stage of this (dp, tp) column (for weights tied across stages, e.g.
  word embeddings and the LM head); None when pp == 1.
- World size != dp * pp * tp is a MeshError raised identically on every rank before any collective (no hang).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class MeshError(ValueError):
    """A parallel layout that cannot be built (names the sizes involved)."""


@dataclass(frozen=True)
class Coords:
    dp: int
    pp: int
    tp: int


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Mesh:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    rank: int = -1
    world_size: int = -1
    groups: dict = field(default_factory=dict, repr=False)
    ranks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("dp", "pp", "tp"):
            if getattr(self, name) < 1:
                raise MeshError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        rank, world = _world()
        self.rank = rank if self.rank < 0 else self.rank
        self.world_size = world if self.world_size < 0 else self.world_size
        if self.dp * self.pp * self.tp != self.world_size:
            raise MeshError(f"parallel layout dp={self.dp} x pp={self.pp} x tp={self.tp} = "
                            f"{self.dp * self.pp * self.tp} does not equal the world size {self.world_size}")
        self._build_groups()

    # ------------------------------------------------------------------ coordinates
    def coords_of(self, rank: int) -> Coords:
        return Coords(rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp)

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    @property
    def coords(self) -> Coords:
        return self.coords_of(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def device(self) -> torch.device:
        """Where collective scratch tensors live: the current GPU under NCCL, else the CPU."""
        if self.world_size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def group(self, dim: str):
        """The process group of dimension 'dp' | 'pp' | 'tp' | 'tied' | 'world' this rank belongs to (or None)."""
        return self.groups[dim]

    def peers(self, dim: str) -> list[int]:
        """Global ranks of this rank's group along `dim`, in coordinate order."""
        return self.ranks[dim]

    def size(self, dim: str) -> int:
        return len(self.ranks[dim])

    # ------------------------------------------------------------------ groups
    def _columns(self, dim: str) -> list[list[int]]:
        """All rank lists along `dim` (every rank computes the same lists in the same order)."""
        c = [self.coords_of(r) for r in range(self.world_size)]
        key = {"dp": lambda x: (x.pp, x.tp), "pp": lambda x: (x.dp, x.tp), "tp": lambda x: (x.dp, x.pp)}[dim]
        cols: dict = {}
        for r, x in enumerate(c):
            cols.setdefault(key(x), []).append(r)
        return list(cols.values())

    def _tied_columns(self) -> list[list[int]]:
        return [[col[0], col[-1]] for col in self._columns("pp")]

    def _build_groups(self) -> None:
        distributed = self.world_size > 1
        for dim, cols in (("dp", self._columns("dp")), ("pp", self._columns("pp")), ("tp", self._columns("tp")),
                          ("tied", self._tied_columns() if self.pp > 1 else [])):
            self.groups[dim], self.ranks[dim] = None, [self.rank]
            for col in cols:
                g = dist.new_group(col) if distributed and len(col) > 1 else None
                if self.rank in col:
                    self.groups[dim], self.ranks[dim] = g, col
        self.groups["world"] = dist.group.WORLD if distributed else None
        self.ranks["world"] = list(range(self.world_size))


# ---------------------------------------------------------------------- collectives that accept size-1 groups
def all_reduce(t: torch.Tensor, mesh: Mesh, dim: str, op=None) -> torch.Tensor:
    """In-place all-reduce of `t` over `dim` (SUM unless op); a no-op when that dimension has size 1."""
    if mesh.size(dim) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=mesh.group(dim))
    return t


def any_true(flag: bool, mesh: Mesh) -> bool:
    """True when `flag` is True on any rank of the world (every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=mesh.device)
    return bool(all_reduce(t, mesh, "world", dist.ReduceOp.MAX if mesh.world_size > 1 else None).item() > 0)
