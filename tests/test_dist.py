"""Rank discovery for every launcher combination (pipeline/dist.py): torchrun, srun (Slurm
tasks of a step), both (torchrun wins), a Slurm batch script or job array without srun (one
process: arrays pass --shard-index), nothing; the local world from SLURM_TASKS_PER_NODE; the
GPU a local rank takes; the job id every rank agrees on."""
from __future__ import annotations

import pytest

from pipeline.dist import RankInfo, device_index, discover_rank, job_id, join_process_group, slurm_tasks_on_node

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
#: task 6 of an ``srun -N 3 -n 7`` step: 3 + 2 + 2 tasks, this one the first on node 2
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
        "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "3,2(x2)", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "991"}
#: the batch script of an ``sbatch --ntasks 7`` job (not a task of an srun step)
BATCH = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
ARRAY = {**BATCH, "SLURM_ARRAY_JOB_ID": "990", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8",
         "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "1", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("env, want", [
    ({}, RankInfo()),
    (TORCHRUN, RankInfo(5, 8, 1, 4, "torchrun")),
    (SRUN, RankInfo(5, 7, 0, 2, "slurm")),
    ({**SRUN, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}, RankInfo(1, 7, 1, 3, "slurm")),
    ({**SRUN, **TORCHRUN}, RankInfo(5, 8, 1, 4, "torchrun")),  # torchrun started by srun: torchrun wins
    (BATCH, RankInfo()),  # the batch script is one process, not rank 5 of 7
    (ARRAY, RankInfo()),  # array tasks are independent jobs (--shard-index/--num-shards)
    ({**ARRAY, "SLURM_STEP_ID": "0"}, RankInfo(0, 1, 0, 1, "slurm")),  # srun -n 1 inside an array task
    # no SLURM_TASKS_PER_NODE: SLURM_NTASKS_PER_NODE, else tasks / nodes
    ({k: v for k, v in SRUN.items() if k != "SLURM_TASKS_PER_NODE"}, RankInfo(5, 7, 0, 2, "slurm")),
    ({**{k: v for k, v in SRUN.items() if k != "SLURM_TASKS_PER_NODE"}, "SLURM_NTASKS_PER_NODE": "3"},
     RankInfo(5, 7, 0, 3, "slurm")),
], ids=["none", "torchrun", "srun", "srun-node0", "torchrun-under-srun", "sbatch-script", "array-task",
        "srun-in-array", "srun-no-tasks-per-node", "srun-ntasks-per-node"])
def test_discover_rank(env: dict, want: RankInfo) -> None:
    assert discover_rank(env) == want


def test_slurm_tasks_per_node_syntax() -> None:
    assert [slurm_tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]
    assert slurm_tasks_on_node("4", 0) == 4
    assert slurm_tasks_on_node("garbage", 0) is None


def test_device_of_a_local_rank() -> None:
    # torchrun or srun without GPU binding: every GPU of the node visible, one per local rank
    assert [device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    # srun --gpus-per-task=1: each task sees one GPU (CUDA_VISIBLE_DEVICES), always its index 0
    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert device_index(5, 4) == 1


def test_job_id_and_process_group_without_a_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = discover_rank(SRUN)
    assert job_id(slurm, SRUN) == "slurm-991.0"
    assert job_id(discover_rank({**ARRAY, "SLURM_STEP_ID": "0"}), {**ARRAY, "SLURM_STEP_ID": "0"}) == "slurm-990_3.0"
    one = job_id(RankInfo(), {})
    assert len(one) == 32 and one != job_id(RankInfo(), {})  # a new id per single-process job
    # no MASTER_ADDR under srun: no process group (rank 0 then waits on the markers)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert join_process_group(slurm) is False
    assert join_process_group(RankInfo()) is False


def test_cores_of_a_rank() -> None:
    import os

    from pipeline.dist import local_cores

    mask = len(os.sched_getaffinity(0))
    four = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert local_cores(env={}) == mask
    assert local_cores(env=four) == max(1, mask // 4)  # torchrun: the node's cores shared by its ranks
    srun = {**SRUN, "SLURM_TASKS_PER_NODE": "4"}
    # srun binding each task to its --cpus-per-task cores: the mask is this task's alone
    assert local_cores(env={**srun, "SLURM_CPUS_PER_TASK": str(mask)}) == mask
    # no binding (the mask is the node's, larger than a task's share): shared among the 4 tasks
    if mask > 1:
        assert local_cores(env={**srun, "SLURM_CPUS_PER_TASK": str(mask - 1)}) == max(1, mask // 4)
