"""Offline validation of ray_cluster.yaml with Ray's own cluster-launcher validator.

`prepare_config` only merges the provider's bundled defaults.yaml (no cloud calls, no credentials, no
boto3), fills per-node-type worker counts and merges the setup commands; `validate_config` checks the
result against Ray's ray-schema.json and the cross-field rules. `ray up` would additionally bootstrap
the provider (IAM role, key pair, security group, subnets), which needs credentials and is not tested."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_validates_offline(prepared):
    assert prepared["provider"]["type"] in {"aws", "gcp", "azure", "local"}
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_two_nodes_with_8_gpus_each_per_model_replica(prepared):
    from configs import ServiceConfig

    app = yaml.safe_load((REPO / "configs/nemotron4_340b.yaml").read_text())["applications"][0]
    replicas = ServiceConfig.model_validate(app["args"]).model
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    # Always up: the first replica's two nodes (head + one worker); at most two nodes per replica.
    assert worker["min_workers"] == 2 * replicas.autoscaling.min_replicas - 1
    assert worker["max_workers"] == prepared["max_workers"] == 2 * replicas.max_replicas - 1
    assert head["max_workers"] == 0
    nodes = [head] + [worker] * worker["min_workers"]
    assert len(nodes) == 2
    assert [n["resources"]["GPU"] for n in nodes] == [8, 8]
    assert sum(n["resources"]["GPU"] for n in nodes) == 16
    # Room for 8 workers x cpus_per_worker plus the replica and Serve's own actors on each node.
    assert all(n["resources"]["CPU"] >= 8 * 2 + 1 for n in nodes)


def test_the_cluster_fits_the_nemotron_placement(prepared):
    from configs import ServiceConfig
    from sharding.placement import placement_for

    app = yaml.safe_load((REPO / "configs/nemotron4_340b.yaml").read_text())["applications"][0]
    plan = placement_for(ServiceConfig.model_validate(app["args"]))
    types = prepared["available_node_types"]
    nodes = [types[prepared["head_node_type"]]["resources"]] + [
        t["resources"] for name, t in types.items() if name != prepared["head_node_type"]
    ]
    # STRICT_SPREAD: one bundle per node, each bundle must fit its node.
    assert plan.strategy == "STRICT_SPREAD" and len(plan.bundles) == len(nodes)
    for bundle in plan.bundles:
        assert all(bundle[k] <= min(n[k] for n in nodes) for k in bundle)


def test_start_commands_declare_the_gpus(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "--head" in head_start and "--num-gpus=8" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "--num-gpus=8" in worker_start


def test_setup_installs_the_project_on_every_node(raw, prepared):
    assert "." in raw["file_mounts"].values()
    assert ".venv" in raw["rsync_exclude"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(prepared[key])  # prepare_config merged setup_commands into both
        assert "scripts/setup.sh" in commands


def test_validator_rejects_a_broken_copy(raw):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu.worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(raw)
    broken["max_workers"] = 0  # below the worker type's min_workers
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))
