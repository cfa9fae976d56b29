"""Where this process sits in a job: rank discovery and device choice, shared by every stage.

Launchers are read, never replaced: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE`` first, then Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
(a task started by ``srun``), else a single process. No process group is created here:
the training stage initialises torch.distributed from the same variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    """``rank`` of ``world`` processes; ``local_rank`` of ``local_world`` on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return default


def discover_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's place in a torchrun or Slurm job (a single process otherwise)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        return RankInfo(_int(env, "RANK", 0), world, _int(env, "LOCAL_RANK", 0),
                        _int(env, "LOCAL_WORLD_SIZE", 1), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        world = _int(env, "SLURM_NTASKS", 1)
        nodes = max(1, _int(env, "SLURM_NNODES", 1))
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", max(1, world // nodes))
        return RankInfo(_int(env, "SLURM_PROCID", 0), world, _int(env, "SLURM_LOCALID", 0), local_world, "slurm")
    return RankInfo()


def local_cores(rank: RankInfo | None = None) -> int:
    """CPU cores this process may use: its affinity mask (a Slurm or container cpuset, not
    the whole machine) shared evenly among the ranks of this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rank = rank or discover_rank()
    return max(1, cores // max(1, rank.local_world))


def resolve_device(name: str, rank: RankInfo | None = None) -> torch.device:
    """``auto``: this rank's GPU (``local_rank`` modulo the GPUs present) or the CPU; else the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            local = (rank or discover_rank()).local_rank
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None
