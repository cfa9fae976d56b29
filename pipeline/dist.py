"""Where this process sits in a job: rank discovery, the job's id, its process group and the
device choice, shared by every stage.

Launchers are read, never replaced: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE`` first (they win when Slurm's are set too, e.g. torchrun started by
``srun``), then Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` of a task started
by ``srun`` (``SLURM_STEP_ID`` set: the batch script itself is not a task of the step), else a
single process. Slurm job arrays are independent jobs: their index is passed as
``--shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT`` (stage 1), not
read here. The process group is created only on request (:func:`join_process_group`).
"""
from __future__ import annotations

import datetime
import os
import re
import uuid
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    """``rank`` of ``world`` processes; ``local_rank`` of ``local_world`` on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launcher: str = "none"  # none | torchrun | slurm | shard-index

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return default


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks Slurm started on node ``node_id`` from ``SLURM_TASKS_PER_NODE`` (``"4"``,
    ``"2(x3),1"``: 2 tasks on each of the first 3 nodes, 1 on the fourth); None if unparsable."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def discover_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's place in a torchrun or ``srun`` job (a single process otherwise)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        return RankInfo(_int(env, "RANK", 0), world, _int(env, "LOCAL_RANK", 0),
                        _int(env, "LOCAL_WORLD_SIZE", 1), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        world = _int(env, "SLURM_NTASKS", 1)
        nodes = max(1, _int(env, "SLURM_NNODES", 1))
        local_world = slurm_tasks_on_node(env.get("SLURM_TASKS_PER_NODE", ""), _int(env, "SLURM_NODEID", 0))
        if local_world is None:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE", max(1, world // nodes))
        return RankInfo(_int(env, "SLURM_PROCID", 0), world, _int(env, "SLURM_LOCALID", 0), local_world, "slurm")
    return RankInfo()


def local_cores(rank: RankInfo | None = None, env: Mapping[str, str] | None = None) -> int:
    """CPU cores this process may use: its affinity mask (a Slurm or container cpuset, not
    the whole machine) shared evenly among the ranks of this node; not shared when Slurm
    bound this task to its own cores (``--cpus-per-task C``, a mask of at most C cores)."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rank = rank or discover_rank(env)
    per_task = _int(env, "SLURM_CPUS_PER_TASK", 0)
    if rank.launcher == "slurm" and 0 < cores <= per_task:
        return cores
    return max(1, cores // max(1, rank.local_world))


def device_index(local_rank: int, visible_gpus: int) -> int:
    """The GPU of the rank with ``local_rank`` among ``visible_gpus``: ``local_rank`` modulo
    the GPUs it sees (one per task when Slurm binds GPUs to tasks, ``--gpus-per-task=1``:
    then always 0; all of the node's under torchrun: its local rank)."""
    return local_rank % max(1, visible_gpus)


def resolve_device(name: str, rank: RankInfo | None = None) -> torch.device:
    """``auto``: this rank's GPU (:func:`device_index`) or the CPU; else the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            local = (rank or discover_rank()).local_rank
            return torch.device("cuda", device_index(local, torch.cuda.device_count()))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None


def join_process_group(info: RankInfo, backend: str = "gloo",
                       timeout: datetime.timedelta | None = None) -> bool:
    """Create the default process group of a launcher's job when it can be reached: True if
    one exists afterwards (created now or before).

    A job of one process, or an ``srun`` job without ``MASTER_ADDR``/``MASTER_PORT`` (torchrun
    always sets them; under Slurm, export them in the batch script) has none: False. Slurm's
    rank is handed to torch through ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. ``timeout``
    bounds every collective (torch's default, 30 min, when None).
    """
    if dist.is_initialized():
        return True
    if info.world <= 1 or info.launcher not in ("torchrun", "slurm"):
        return False
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return False
    if info.launcher == "slurm":  # torch reads its rendezvous from these variables
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, **kwargs)
    return True


def job_id(info: RankInfo, env: Mapping[str, str] | None = None) -> str:
    """An id every process of this job agrees on, new for each job (stage 1 records it in
    the shard markers, so rank 0 can add up what the job did).

    With a process group: rank 0's random id, broadcast. Else under ``srun``: the Slurm job
    and step (``slurm-1234.0``; array tasks: ``slurm-1234_7.0``). Else (one process, or
    ``--shard-index`` jobs, each its own job): a random id.
    """
    env = os.environ if env is None else env
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    if info.launcher == "slurm":
        job = env.get("SLURM_JOB_ID", "?")
        if "SLURM_ARRAY_JOB_ID" in env:
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '?')}"
        return f"slurm-{job}.{env.get('SLURM_STEP_ID', '?')}"
    return uuid.uuid4().hex
