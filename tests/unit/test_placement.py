"""Unit tests of the pure placement functions: bundles, strategy, rank -> (stage, tensor rank, bundle) and
the per-node CUDA_VISIBLE_DEVICES / local-rank assignment. No Ray cluster is started."""

from __future__ import annotations

import itertools

import pytest

from configs import ServiceConfig
from sharding.placement import PlacementPlan, WorkerSlot, placement_for, plan_placement, visible_devices_by_node

TPS = (1, 2, 4, 8)
PPS = (1, 2, 3, 4)
GPUS_PER_NODE = (1, 2, 4, 8)


def _plan(tp: int, pp: int, gpn: int, *, use_gpus: bool = True, cpus: float = 2.0, replica: float = 0.5,
          strategy: str = "STRICT_SPREAD") -> PlacementPlan:
    return plan_placement(tensor_parallel_size=tp, pipeline_parallel_size=pp, gpus_per_node=gpn,
                          cpus_per_worker=cpus, replica_cpus=replica, use_gpus=use_gpus, strategy=strategy)


# --- the real layout: Nemotron-4-340B-Reward, TP 8 x PP 2 on two 8-GPU nodes -------------------------------


def test_nemotron_tp8_pp2_on_two_8_gpu_nodes():
    plan = _plan(8, 2, 8, cpus=2.0, replica=1.0)
    assert plan.strategy == "STRICT_SPREAD"
    assert plan.bundles == [{"CPU": 8 * 2.0 + 1.0, "GPU": 8.0}, {"CPU": 8 * 2.0, "GPU": 8.0}]
    assert plan.gpus_per_worker == 1.0
    assert plan.cpus_per_worker == 2.0
    assert len(plan.workers) == 16
    expected = {rank: (rank // 8, rank % 8, rank // 8) for rank in range(16)}
    got = {w.rank: (w.pipeline_rank, w.tensor_rank, w.bundle_index) for w in plan.workers}
    assert got == expected
    # Spot checks of megatron's order rank = pp_rank * tp + tp_rank.
    assert plan.workers[0] == WorkerSlot(rank=0, pipeline_rank=0, tensor_rank=0, bundle_index=0)
    assert plan.workers[7] == WorkerSlot(rank=7, pipeline_rank=0, tensor_rank=7, bundle_index=0)
    assert plan.workers[8] == WorkerSlot(rank=8, pipeline_rank=1, tensor_rank=0, bundle_index=1)
    assert plan.workers[15] == WorkerSlot(rank=15, pipeline_rank=1, tensor_rank=7, bundle_index=1)


def test_nemotron_layout_from_service_config():
    config = ServiceConfig(
        checkpoint_path="/models/x",
        parallel={"tensor_parallel_size": 8, "pipeline_parallel_size": 2},
        runtime={"device": "cuda", "dtype": "bfloat16", "backend": "nccl", "gpus_per_node": 8,
                 "cpus_per_worker": 2, "replica_cpus": 1},
    )
    plan = placement_for(config)
    assert plan.bundles == [{"CPU": 17.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}]
    assert plan.strategy == "STRICT_SPREAD"
    assert [w.rank for w in plan.workers] == list(range(16))


# --- a grid of (TP, PP, GPUs per node) ------------------------------------------------------------------


@pytest.mark.parametrize("tp,pp,gpn", list(itertools.product(TPS, PPS, GPUS_PER_NODE)))
def test_gpu_grid(tp: int, pp: int, gpn: int):
    if tp > gpn:
        with pytest.raises(ValueError) as e:
            _plan(tp, pp, gpn)
        assert f"tensor_parallel_size {tp}" in str(e.value)
        assert f"gpus_per_node {gpn}" in str(e.value)
        return
    cpus, replica = 1.5, 0.25
    plan = _plan(tp, pp, gpn, cpus=cpus, replica=replica)
    # One bundle per stage; each holds exactly one TP group and fits one node.
    assert len(plan.bundles) == pp
    for stage, bundle in enumerate(plan.bundles):
        assert set(bundle) == {"CPU", "GPU"}
        assert bundle["GPU"] == tp <= gpn
        assert bundle["CPU"] == pytest.approx(tp * cpus + (replica if stage == 0 else 0.0))
    # Every rank exactly once, in megatron order, in its stage's bundle.
    assert [w.rank for w in plan.workers] == list(range(tp * pp))
    for w in plan.workers:
        assert w.rank == w.pipeline_rank * tp + w.tensor_rank
        assert 0 <= w.tensor_rank < tp
        assert 0 <= w.pipeline_rank < pp
        assert w.bundle_index == w.pipeline_rank
    # Worker resources add up to the bundles (the replica's CPUs are the only extra).
    for stage, bundle in enumerate(plan.bundles):
        members = [w for w in plan.workers if w.bundle_index == stage]
        assert len(members) == tp
        assert len(members) * plan.gpus_per_worker == bundle["GPU"]
        assert len(members) * plan.cpus_per_worker <= bundle["CPU"]
    assert sum(b["CPU"] for b in plan.bundles) == pytest.approx(tp * pp * cpus + replica)


@pytest.mark.parametrize("tp,pp", list(itertools.product(TPS, PPS)))
def test_cpu_only_grid_has_no_gpu_key(tp: int, pp: int):
    # gpus_per_node is irrelevant on CPU: a TP group larger than it is fine.
    plan = _plan(tp, pp, 0, use_gpus=False, cpus=1.0, replica=0.1)
    assert plan.gpus_per_worker == 0.0
    assert len(plan.bundles) == pp
    for stage, bundle in enumerate(plan.bundles):
        assert "GPU" not in bundle
        assert bundle == {"CPU": pytest.approx(tp * 1.0 + (0.1 if stage == 0 else 0.0))}
    assert [(w.rank, w.pipeline_rank, w.tensor_rank, w.bundle_index) for w in plan.workers] == [
        (s * tp + t, s, t, s) for s in range(pp) for t in range(tp)
    ]


def test_replica_cpus_go_to_bundle_0_only():
    plan = _plan(2, 3, 8, cpus=1.0, replica=3.0)
    assert [b["CPU"] for b in plan.bundles] == [5.0, 2.0, 2.0]
    plan = _plan(2, 3, 8, cpus=1.0, replica=0.0)
    assert [b["CPU"] for b in plan.bundles] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("strategy", ["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"])
def test_strategy_passes_through(strategy: str):
    assert _plan(2, 2, 2, strategy=strategy).strategy == strategy


def test_tp_larger_than_node_names_both_numbers():
    with pytest.raises(ValueError, match=r"tensor_parallel_size 16 .*gpus_per_node 8"):
        _plan(16, 2, 8)


@pytest.mark.parametrize("tp,pp", [(0, 1), (1, 0), (-1, 2)])
def test_non_positive_sizes_rejected(tp: int, pp: int):
    with pytest.raises(ValueError, match=f"tensor_parallel_size {tp} and pipeline_parallel_size {pp}"):
        _plan(tp, pp, 8)


def test_placement_for_cpu_config():
    config = ServiceConfig(checkpoint_path="x", parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                           runtime={"cpus_per_worker": 1, "replica_cpus": 0.1})
    plan = placement_for(config)
    assert plan.bundles == [{"CPU": pytest.approx(2.1)}, {"CPU": 2.0}]
    assert plan.gpus_per_worker == 0.0


def test_placement_for_logical_gpus_on_cpu():
    # gpus_per_node > 0 on device cpu: test clusters declare logical GPUs, and each worker reserves one.
    config = ServiceConfig(checkpoint_path="x", parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                           runtime={"gpus_per_node": 2, "cpus_per_worker": 1, "replica_cpus": 0})
    plan = placement_for(config)
    assert plan.bundles == [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0}]
    assert plan.gpus_per_worker == 1.0


def test_placement_for_passes_strategy():
    config = ServiceConfig(checkpoint_path="x", parallel={"pipeline_parallel_size": 2, "placement_strategy": "PACK"})
    assert placement_for(config).strategy == "PACK"


# --- visible devices per node ---------------------------------------------------------------------------


def test_visible_devices_two_nodes_out_of_order():
    # TP 8 x PP 2: Ray hands each worker one GPU id, in no particular order.
    node_a = ["5", "2", "7", "0", "3", "6", "1", "4"]
    node_b = ["1", "0", "3", "2", "7", "6", "5", "4"]
    gpu_ids = {r: ("node-a", [node_a[r]]) for r in range(8)}
    gpu_ids.update({8 + r: ("node-b", [node_b[r]]) for r in range(8)})
    out = visible_devices_by_node(gpu_ids)
    assert set(out) == set(range(16))
    for rank, (visible, local_rank) in out.items():
        assert visible == "0,1,2,3,4,5,6,7"
        own = gpu_ids[rank][1][0]
        assert local_rank == int(own)  # the index of its own GPU in the sorted list
    # Local ranks on a node are a permutation: no two workers share a device.
    assert sorted(out[r][1] for r in range(8)) == list(range(8))
    assert sorted(out[r][1] for r in range(8, 16)) == list(range(8))


def test_visible_devices_sorted_numerically_and_per_node():
    # A node whose model GPUs are a subset, with two-digit ids: sort as numbers, not strings.
    gpu_ids = {0: ("n1", ["10"]), 1: ("n1", ["2"]), 2: ("n2", ["3"]), 3: ("n2", ["1"]), 4: ("n1", ["9"])}
    out = visible_devices_by_node(gpu_ids)
    assert out == {
        0: ("2,9,10", 2),
        1: ("2,9,10", 0),
        2: ("1,3", 1),
        3: ("1,3", 0),
        4: ("2,9,10", 1),
    }


def test_visible_devices_single_worker():
    assert visible_devices_by_node({0: ("n", ["3"])}) == {0: ("3", 0)}


@pytest.mark.parametrize("bad", [[], ["0", "1"]])
def test_visible_devices_rejects_worker_without_exactly_one_gpu(bad: list[str]):
    gpu_ids = {0: ("n1", ["0"]), 1: ("n1", bad), 2: ("n2", ["0"])}
    with pytest.raises(ValueError, match="rank 1 .*exactly one"):
        visible_devices_by_node(gpu_ids)
