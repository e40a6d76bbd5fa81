"""Unit tests of the typed configs (configs/*.py) and of the Serve config files that carry them."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

import configs.base
import configs.model
import configs.service
from configs import (
    ATTRIBUTE_NAMES,
    DEFAULT_WEIGHTS,
    ModelArchConfig,
    ParallelConfig,
    RouterConfig,
    RuntimeConfig,
    ScoringConfig,
    ServiceConfig,
)
from configs.base import StrictModel
from configs.model import TokenizerRef
from sharding.checkpoints.nemo import arch_from_nemo_config

REPO = Path(__file__).resolve().parents[2]

TOKENIZER = {"library": "sentencepiece", "model": "nemo:tok.model"}

# A small, consistent architecture (head dim 8, rotary 4 of 8).
SMALL_ARCH: dict[str, Any] = {
    "num_layers": 4,
    "hidden_size": 64,
    "ffn_hidden_size": 256,
    "num_attention_heads": 8,
    "num_query_groups": 8,
    "normalization": "layernorm1p",
    "layernorm_epsilon": 1e-5,
    "activation": "squared-relu",
    "position_embedding_type": "rope",
    "rotary_percentage": 0.5,
    "bias": False,
    "share_embeddings_and_output_weights": False,
    "max_position_embeddings": 4096,
    "padded_vocab_size": 1024,
    "num_attributes": 9,
    "tokenizer": TOKENIZER,
}


def arch(**overrides: Any) -> ModelArchConfig:
    return ModelArchConfig(**{**SMALL_ARCH, **overrides})


def nemotron_nemo_dict() -> dict[str, Any]:
    """model_config.yaml of Nemotron-4-340B-Reward as NeMo writes it (with training-only keys)."""
    return {
        "mcore_gpt": True,
        "micro_batch_size": 1,
        "global_batch_size": 128,
        "tensor_model_parallel_size": 8,
        "pipeline_model_parallel_size": 8,
        "encoder_seq_length": 4096,
        "max_position_embeddings": 4096,
        "num_layers": 96,
        "hidden_size": 18432,
        "ffn_hidden_size": 73728,
        "num_attention_heads": 96,
        "num_query_groups": 8,
        "kv_channels": None,
        "init_method_std": 0.0063,
        "normalization": "layernorm1p",
        "layernorm_epsilon": 1.0e-5,
        "activation": "squared-relu",
        "bias": False,
        "position_embedding_type": "rope",
        "rotary_percentage": 0.5,
        "rotary_base": 10000,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128,
        "precision": "bf16",
        "tokenizer": {"library": "sentencepiece", "type": None, "model": "nemo:abc_nemotron_2_256k.model",
                      "vocab_file": None, "merge_file": None, "sentencepiece_legacy": False},
        "optim": {"name": "distributed_fused_adam", "lr": 3e-7},
        "data": {"data_prefix": None, "seq_length": 4096},
        "reward_model_type": "regression",
        "regression": {"num_attributes": 9, "merge_attributes": False, "attribute_weights": None},
        "output_sequence_length": 9,
    }


def nemotron_arch() -> ModelArchConfig:
    return arch_from_nemo_config(nemotron_nemo_dict(), vocab_size=256000)


def nemotron_service(**overrides: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "checkpoint_path": "/models/Nemotron-4-340B-Reward",
        "parallel": {"tensor_parallel_size": 8, "pipeline_parallel_size": 2},
        "runtime": {"device": "cuda", "dtype": "bfloat16", "backend": "nccl", "gpus_per_node": 8},
        "router": {"max_tokens_per_batch": 16384, "max_input_tokens": 4096},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return ServiceConfig.model_validate(data)


# --- every config model: strict, frozen, documented ----------------------------------------------------

# A minimal valid payload for each config model.
MINIMAL: dict[type[BaseModel], dict[str, Any]] = {
    TokenizerRef: TOKENIZER,
    ModelArchConfig: SMALL_ARCH,
    ParallelConfig: {},
    RuntimeConfig: {},
    RouterConfig: {},
    ScoringConfig: {},
    ServiceConfig: {"checkpoint_path": "/x"},
}


def _config_models() -> list[type[BaseModel]]:
    """Every pydantic model class defined in the configs package (found by introspection)."""
    found: dict[str, type[BaseModel]] = {}
    for module in (configs.base, configs.model, configs.service):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseModel) and obj.__module__.startswith("configs."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


CONFIG_MODELS = [m for m in _config_models() if m is not StrictModel]


def test_introspection_finds_the_known_models():
    assert set(MINIMAL) <= set(CONFIG_MODELS)


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_model_is_strict_and_frozen(model: type[BaseModel]):
    assert issubclass(model, StrictModel)
    assert model.model_config.get("extra") == "forbid"
    assert model.model_config.get("frozen") is True


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]):
    assert model.model_fields, f"{model.__name__} has no fields"
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{model.__name__} fields without a description: {missing}"


@pytest.mark.parametrize("model", list(MINIMAL), ids=lambda m: m.__name__)
def test_extra_keys_rejected(model: type[BaseModel]):
    instance = model.model_validate(MINIMAL[model])
    with pytest.raises(ValidationError) as info:
        model.model_validate({**MINIMAL[model], "no_such_key": 1})
    assert [e["type"] for e in info.value.errors()] == ["extra_forbidden"]
    assert info.value.errors()[0]["loc"] == ("no_such_key",)
    # Frozen: no silent mutation after validation.
    first_field = next(iter(model.model_fields))
    with pytest.raises(ValidationError):
        setattr(instance, first_field, getattr(instance, first_field))


@pytest.mark.parametrize("section", ["parallel", "runtime", "router", "scoring"])
def test_extra_keys_rejected_in_nested_sections(section: str):
    with pytest.raises(ValidationError) as info:
        ServiceConfig.model_validate({"checkpoint_path": "/x", section: {"typo_key": 1}})
    assert info.value.errors()[0]["loc"] == (section, "typo_key")
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_extra_key_rejected_in_nested_tokenizer():
    with pytest.raises(ValidationError, match="extra"):
        arch(tokenizer={**TOKENIZER, "type": None})


def test_service_defaults():
    config = ServiceConfig(checkpoint_path="/x")
    assert config.parallel.world_size == 1
    assert config.runtime.device == "cpu" and config.runtime.backend == "gloo"
    assert config.runtime.dtype == "float32"
    assert config.scoring.attribute_names == ATTRIBUTE_NAMES
    assert config.scoring.weights == DEFAULT_WEIGHTS
    assert config.router.max_tokens_per_batch == 16384
    with pytest.raises(ValidationError, match="checkpoint_path"):
        ServiceConfig.model_validate({})


def test_model_dump_round_trips():
    config = nemotron_service()
    assert ServiceConfig.model_validate(config.model_dump(mode="json")) == config


# --- ParallelConfig.check_against(ModelArchConfig) -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides,tp,pp,message",
    [
        ({"num_attention_heads": 6, "num_query_groups": 2, "kv_channels": 8},
         4, 1, "num_attention_heads 6 is not divisible by tensor_parallel_size 4"),
        ({"num_query_groups": 2}, 4, 1, "num_query_groups 2 is not divisible by tensor_parallel_size 4"),
        ({"padded_vocab_size": 1004}, 8, 1, "padded_vocab_size 1004 is not divisible by tensor_parallel_size 8"),
        ({"ffn_hidden_size": 100}, 8, 1, "ffn_hidden_size 100 is not divisible by tensor_parallel_size 8"),
        ({"hidden_size": 60, "kv_channels": 8}, 8, 1, "hidden_size 60 is not divisible by tensor_parallel_size 8"),
        ({"num_layers": 3}, 1, 2, "num_layers 3 is not divisible by pipeline_parallel_size 2"),
        ({"num_layers": 96}, 1, 5, "num_layers 96 is not divisible by pipeline_parallel_size 5"),
    ],
)
def test_parallel_check_against_names_numbers(overrides, tp, pp, message):
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    with pytest.raises(ValueError, match=message):
        parallel.check_against(arch(**overrides))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 4), (8, 2), (8, 4), (1, 4)])
def test_parallel_check_against_accepts_valid_splits(tp, pp):
    ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp).check_against(arch())
    assert ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp).world_size == tp * pp


def test_nemotron_splits():
    a = nemotron_arch()
    ParallelConfig(tensor_parallel_size=8, pipeline_parallel_size=2).check_against(a)
    ParallelConfig(tensor_parallel_size=8, pipeline_parallel_size=4).check_against(a)
    with pytest.raises(ValueError, match="num_query_groups 8 is not divisible by tensor_parallel_size 16"):
        ParallelConfig(tensor_parallel_size=16, pipeline_parallel_size=1).check_against(a)
    with pytest.raises(ValueError, match="num_layers 96 is not divisible by pipeline_parallel_size 7"):
        ParallelConfig(tensor_parallel_size=8, pipeline_parallel_size=7).check_against(a)


@pytest.mark.parametrize("field,value", [("tensor_parallel_size", 0), ("pipeline_parallel_size", 0),
                                         ("max_tokens_per_micro_batch", 0), ("batch_layout", "sorted"),
                                         ("placement_strategy", "RANDOM")])
def test_parallel_field_bounds(field, value):
    with pytest.raises(ValidationError, match=field):
        ParallelConfig(**{field: value})


# --- RuntimeConfig and ServiceConfig cross-field checks ------------------------------------------------


def test_cpu_with_nccl_rejected():
    with pytest.raises(ValidationError, match="backend nccl needs device cuda"):
        RuntimeConfig(device="cpu", backend="nccl")


def test_cpu_takes_bfloat16_but_not_float16():
    assert RuntimeConfig(device="cpu", dtype="bfloat16").dtype == "bfloat16"  # the GPU dtype path, checked on CPU
    with pytest.raises(ValidationError, match="dtype float16 is not supported on cpu"):
        RuntimeConfig(device="cpu", dtype="float16")


def test_sequence_parallel_needs_tensor_parallelism():
    assert not ParallelConfig().sequence_parallel
    assert ParallelConfig(tensor_parallel_size=2, sequence_parallel=True).sequence_parallel
    with pytest.raises(ValidationError, match="sequence_parallel needs tensor_parallel_size > 1"):
        ParallelConfig(tensor_parallel_size=1, sequence_parallel=True)


def test_cuda_needs_gpus():
    with pytest.raises(ValidationError, match="device cuda needs gpus_per_node >= 1"):
        RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=0)
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=8)
    assert runtime.gpus_per_node == 8


def test_runtime_values_must_be_strings_and_positive():
    with pytest.raises(ValidationError):
        RuntimeConfig(worker_env={"NCCL_IB_DISABLE": 0})
    with pytest.raises(ValidationError):
        RuntimeConfig(cpus_per_worker=0)
    with pytest.raises(ValidationError):
        RuntimeConfig(gpus_per_node=-1)


def test_tp_larger_than_gpus_per_node_names_both_numbers():
    with pytest.raises(ValidationError, match="tensor_parallel_size 16 is larger than gpus_per_node 8"):
        nemotron_service(parallel={"tensor_parallel_size": 16})
    assert nemotron_service().parallel.world_size == 16
    # Logical GPUs on a CPU test cluster are checked the same way.
    with pytest.raises(ValidationError, match="tensor_parallel_size 4 is larger than gpus_per_node 2"):
        ServiceConfig(checkpoint_path="/x", parallel={"tensor_parallel_size": 4}, runtime={"gpus_per_node": 2})


def test_weights_length_must_match_attribute_names():
    with pytest.raises(ValidationError, match="weights has 2 values; attribute_names has 3"):
        ScoringConfig(attribute_names=("a", "b", "c"), weights=(0.5, 0.5))
    assert ScoringConfig(attribute_names=("a", "b"), weights=(1.0, -1.0)).weights == (1.0, -1.0)


def test_one_of_names_or_weights_is_completed_from_the_checkpoint():
    base = ServiceConfig(checkpoint_path="x", scoring={"weights": [0.5, 0.5]})  # names come from the checkpoint
    assert base.with_output_names(("a", "b")).scoring.attribute_names == ("a", "b")
    with pytest.raises(ValidationError, match="weights has 2 values; attribute_names has 9"):
        base.with_output_names(ATTRIBUTE_NAMES)
    single = ServiceConfig(checkpoint_path="x").with_output_names(("reward",))
    assert single.scoring.weights == (1.0,)
    assert ServiceConfig(checkpoint_path="x").with_output_names(ATTRIBUTE_NAMES).scoring.weights == DEFAULT_WEIGHTS
    with pytest.raises(ValueError, match="set scoring.weights"):
        ServiceConfig(checkpoint_path="x").with_output_names(("a", "b", "c"))


def test_attribute_names_unique_and_non_empty():
    with pytest.raises(ValidationError, match="duplicates"):
        ScoringConfig(attribute_names=("a", "a"), weights=(1.0, 1.0))
    with pytest.raises(ValidationError):
        ScoringConfig(attribute_names=(), weights=())


def test_service_check_against_nemotron_passes():
    config = nemotron_service()
    a = nemotron_arch()
    config.check_against(a)
    assert config.max_input_tokens(a) == 4096


def test_max_tokens_per_batch_below_per_conversation_limit():
    a = arch(max_position_embeddings=4096)
    with pytest.raises(ValueError, match="max_tokens_per_batch 2048 is below the per-conversation limit 4096"):
        ServiceConfig(checkpoint_path="/x", router={"max_tokens_per_batch": 2048}).check_against(a)
    with pytest.raises(ValueError, match="max_tokens_per_batch 3000 is below the per-conversation limit 3072"):
        ServiceConfig(checkpoint_path="/x",
                      router={"max_tokens_per_batch": 3000, "max_input_tokens": 3072}).check_against(a)
    # A smaller per-conversation limit lets a smaller batch budget through.
    config = ServiceConfig(checkpoint_path="/x", router={"max_tokens_per_batch": 2048, "max_input_tokens": 1024})
    config.check_against(a)
    assert config.max_input_tokens(a) == 1024


def test_micro_batch_budget_below_per_conversation_limit():
    a = arch(max_position_embeddings=4096)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch 4000 is below the per-conversation limit 4096"):
        ServiceConfig(checkpoint_path="/x", parallel={"max_tokens_per_micro_batch": 4000}).check_against(a)
    ServiceConfig(checkpoint_path="/x", parallel={"max_tokens_per_micro_batch": 4096}).check_against(a)
    ServiceConfig(checkpoint_path="/x", parallel={"max_tokens_per_micro_batch": 1024},
                  router={"max_input_tokens": 1024}).check_against(a)


def test_max_input_tokens_above_model_context():
    a = arch(max_position_embeddings=4096)
    config = ServiceConfig(checkpoint_path="/x", router={"max_tokens_per_batch": 16384, "max_input_tokens": 8192})
    with pytest.raises(ValueError, match="max_input_tokens 8192 exceeds the model's max_position_embeddings 4096"):
        config.max_input_tokens(a)
    with pytest.raises(ValueError, match="8192.*4096"):
        config.check_against(a)


def test_attribute_count_must_match_reward_head():
    config = ServiceConfig(checkpoint_path="/x", scoring={"attribute_names": ["a", "b"], "weights": [1, 1]})
    with pytest.raises(ValueError, match="scoring.attribute_names has 2 names; the reward head has 9"):
        config.check_against(arch())


def test_service_check_against_runs_parallel_checks():
    config = ServiceConfig(checkpoint_path="/x", parallel={"pipeline_parallel_size": 3})
    with pytest.raises(ValueError, match="num_layers 4 is not divisible by pipeline_parallel_size 3"):
        config.check_against(arch())


# --- ModelArchConfig and arch_from_nemo_config ----------------------------------------------------------------


def test_arch_from_nemo_config_nemotron():
    a = nemotron_arch()
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size) == (96, 18432, 73728)
    assert (a.num_attention_heads, a.num_query_groups, a.head_dim) == (96, 8, 192)
    assert a.kv_channels is None
    assert a.normalization == "layernorm1p" and a.activation == "squared-relu" and a.bias is False
    assert a.rotary_percentage == 0.5 and a.rotary_base == 10000
    assert a.max_position_embeddings == 4096
    assert a.padded_vocab_size == 256000  # already a multiple of 128 * 8
    assert a.num_attributes == 9
    assert a.rm_head_bias is True
    assert a.tokenizer == TokenizerRef(library="sentencepiece", model="nemo:abc_nemotron_2_256k.model")


@pytest.mark.parametrize(
    "vocab,divisible_by,tp,padded",
    [
        (256000, 128, 1, 256000),
        (32000, 128, 1, 32000),
        (32001, 128, 1, 32128),
        (1000, 128, 1, 1024),
        (1000, 64, 1, 1024),
        (1000, 100, 1, 1000),
        (32000, 128, 8, 32768),  # NeMo pads to make_vocab_size_divisible_by * tensor_model_parallel_size
        (32001, 128, 2, 32256),
    ],
)
def test_arch_from_nemo_config_pads_vocab(vocab, divisible_by, tp, padded):
    cfg = nemotron_nemo_dict()
    cfg["make_vocab_size_divisible_by"] = divisible_by
    cfg["tensor_model_parallel_size"] = tp
    assert arch_from_nemo_config(cfg, vocab_size=vocab).padded_vocab_size == padded


def test_arch_from_nemo_config_vocab_padding_defaults():
    cfg = nemotron_nemo_dict()
    del cfg["make_vocab_size_divisible_by"], cfg["tensor_model_parallel_size"]
    assert arch_from_nemo_config(cfg, vocab_size=1000).padded_vocab_size == 1024


def test_arch_from_nemo_config_explicit_padded_vocab_wins():
    cfg = {**nemotron_nemo_dict(), "padded_vocab_size": 256128}
    assert arch_from_nemo_config(cfg, vocab_size=256000).padded_vocab_size == 256128
    assert arch_from_nemo_config(cfg).padded_vocab_size == 256128


def test_arch_from_nemo_config_needs_a_vocab_size():
    with pytest.raises(ValueError, match="no padded_vocab_size and no tokenizer size"):
        arch_from_nemo_config(nemotron_nemo_dict())


def test_arch_from_nemo_config_num_attributes_sources():
    cfg = nemotron_nemo_dict()
    cfg["regression"] = {"num_attributes": 5}
    cfg["output_sequence_length"] = 7
    assert arch_from_nemo_config(cfg, vocab_size=256000).num_attributes == 5
    del cfg["regression"]
    assert arch_from_nemo_config(cfg, vocab_size=256000).num_attributes == 7
    del cfg["output_sequence_length"]
    assert arch_from_nemo_config(cfg, vocab_size=256000).num_attributes == 1


def test_arch_from_nemo_config_fallbacks():
    cfg = nemotron_nemo_dict()
    cfg["num_query_groups"] = None  # NeMo writes null for plain multi-head attention
    del cfg["max_position_embeddings"]
    cfg["encoder_seq_length"] = 2048
    a = arch_from_nemo_config(cfg, vocab_size=256000)
    assert a.num_query_groups == 96
    assert a.max_position_embeddings == 2048


def test_arch_from_nemo_config_does_not_mutate_input():
    cfg = nemotron_nemo_dict()
    before = copy.deepcopy(cfg)
    arch_from_nemo_config(cfg, vocab_size=256000)
    assert cfg == before


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"rotary_percentage": 0.3}, "rotary_percentage 0.3 of head dim 192"),  # 57.6: not whole
        ({"hidden_size": 18432 - 96 * 2, "kv_channels": 190, "rotary_percentage": 0.5},
         "rotary_percentage 0.5 of head dim 190 gives 95"),  # whole but odd
        ({"position_embedding_type": "learned_absolute"}, "position_embedding_type"),
        ({"rotary_percentage": 0.0}, "rotary_percentage"),
        ({"rotary_percentage": 1.5}, "rotary_percentage"),
    ],
)
def test_arch_from_nemo_config_rotary_checks(overrides, message):
    cfg = {**nemotron_nemo_dict(), **overrides}
    with pytest.raises(ValidationError, match=message):
        arch_from_nemo_config(cfg, vocab_size=256000)


@pytest.mark.parametrize("percentage,rotary_dim", [(1.0, 192), (0.5, 96), (0.25, 48)])
def test_rotary_fractions_accepted(percentage, rotary_dim):
    a = arch_from_nemo_config({**nemotron_nemo_dict(), "rotary_percentage": percentage}, vocab_size=256000)
    assert a.head_dim * a.rotary_percentage == rotary_dim


def test_arch_shape_checks_name_numbers():
    with pytest.raises(ValidationError, match="hidden_size 100 is not divisible by num_attention_heads 8"):
        arch(hidden_size=100)
    assert arch(hidden_size=100, kv_channels=8).head_dim == 8
    with pytest.raises(ValidationError, match="num_attention_heads 8 is not divisible by num_query_groups 3"):
        arch(num_query_groups=3)


@pytest.mark.parametrize("field,value", [("normalization", "groupnorm"), ("activation", "geglu"),
                                         ("num_layers", 0), ("layernorm_epsilon", 0)])
def test_arch_rejects_unsupported_values(field, value):
    with pytest.raises(ValidationError, match=field):
        arch(**{field: value})


def test_tokenizer_library_must_be_known():
    cfg = nemotron_nemo_dict()
    cfg["tokenizer"] = {"library": "megatron", "model": "x"}
    with pytest.raises(ValidationError, match="library"):
        arch_from_nemo_config(cfg, vocab_size=256000)


# --- the Serve config files ------------------------------------------------------------------------------

SERVE_CONFIGS = ["configs/local.yaml", "configs/nemotron4_340b.yaml"]


def _serve_schema(path: str):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load((REPO / path).read_text()))


@pytest.mark.parametrize("path", SERVE_CONFIGS)
def test_serve_config_files_validate(path):
    schema = _serve_schema(path)
    assert schema.proxy_location.value == "HeadOnly"
    assert [app.name for app in schema.applications] == ["reward"]
    for app in schema.applications:
        assert app.import_path == "serve_app:build_app"
        config = ServiceConfig.model_validate(app.args)
        assert len(config.scoring.weights) == len(config.scoring.attribute_names)


@pytest.mark.parametrize("path", SERVE_CONFIGS)
def test_serve_config_deployment_overrides_name_real_deployments(path):
    from deployments.reward_model import RewardModelDeployment
    from deployments.router import Router
    from deployments.scoring import ScoringDeployment

    known = {d.name for d in (RewardModelDeployment, Router, ScoringDeployment)}
    for app in _serve_schema(path).applications:
        for deployment in app.deployments:
            assert deployment.name in known
            # Placement and actor options come from build_app; a config-file override would bypass them.
            fields_set = deployment.model_fields_set
            assert not {"placement_group_bundles", "placement_group_strategy", "ray_actor_options"} & fields_set


@pytest.mark.parametrize("path", SERVE_CONFIGS)
def test_serve_config_files_bound_slow_clients(path):
    """Serve's HTTP timeouts are set (tests/integration/test_slow_clients.py shows what they close), and
    scripts/serve_local.py hands them to serve.start."""
    options = _serve_schema(path).http_options
    assert {"keep_alive_timeout_s", "request_timeout_s"} <= options.model_fields_set
    assert options.keep_alive_timeout_s == 5 and options.request_timeout_s == 300  # Serve's defaults: 90 and none
    given_to_serve_start = options.model_dump()
    assert (given_to_serve_start["keep_alive_timeout_s"], given_to_serve_start["request_timeout_s"]) == (5, 300)


def test_nemotron_serve_config_is_the_release_layout():
    from sharding.placement import placement_for

    schema = _serve_schema("configs/nemotron4_340b.yaml")
    assert schema.http_options.host == "0.0.0.0"
    (app,) = schema.applications
    config = ServiceConfig.model_validate(app.args)
    assert config.checkpoint_path.startswith("/")
    assert (config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size) == (8, 2)
    assert (config.runtime.device, config.runtime.dtype, config.runtime.backend) == ("cuda", "bfloat16", "nccl")
    assert config.runtime.gpus_per_node == 8
    assert config.router.max_tokens_per_batch == 16384
    assert config.scoring.weights == DEFAULT_WEIGHTS
    config.check_against(nemotron_arch())
    assert config.max_input_tokens(nemotron_arch()) == 4096

    plan = placement_for(config)
    assert plan.strategy == "STRICT_SPREAD"
    assert [b["GPU"] for b in plan.bundles] == [8, 8]
    cpus = config.runtime.cpus_per_worker
    assert plan.bundles[0]["CPU"] == pytest.approx(8 * cpus + config.runtime.replica_cpus)
    assert plan.bundles[1]["CPU"] == pytest.approx(8 * cpus)
    assert len(plan.workers) == 16

    (model,) = [d for d in app.deployments if d.name == "RewardModelDeployment"]
    assert model.health_check_timeout_s > config.runtime.health_check_timeout_s
    assert model.graceful_shutdown_timeout_s >= 60


def test_local_serve_config_is_cpu():
    from sharding.placement import placement_for

    (app,) = _serve_schema("configs/local.yaml").applications
    config = ServiceConfig.model_validate(app.args)
    assert config.runtime.device == "cpu"
    assert all("GPU" not in b for b in placement_for(config).bundles)


def test_max_batches_in_flight_defaults_to_pipeline_depth_plus_one():
    assert ServiceConfig(checkpoint_path="/x", parallel={"pipeline_parallel_size": 2}).max_batches_in_flight == 3
    assert ServiceConfig(checkpoint_path="/x").max_batches_in_flight == 2
    given = ServiceConfig(checkpoint_path="/x", router={"max_batches_in_flight": 5})
    assert given.max_batches_in_flight == 5


def test_queue_bound_below_the_batch_budget_is_refused():
    with pytest.raises(ValidationError, match="max_queued_tokens 1000 is below max_tokens_per_batch 2048"):
        RouterConfig(max_tokens_per_batch=2048, max_queued_tokens=1000)


def test_long_request_cap_above_the_batch_budget_is_refused():
    with pytest.raises(ValidationError, match="long_request_tokens_per_batch 4096 is above max_tokens_per_batch 2048"):
        RouterConfig(max_tokens_per_batch=2048, long_request_tokens_per_batch=4096)
    capped = RouterConfig(max_tokens_per_batch=2048, long_request_tokens_per_batch=2048)
    assert capped.long_request_tokens_per_batch == 2048


def test_scatter_gather_activations_is_on_by_default():
    assert ParallelConfig().scatter_gather_activations is True
