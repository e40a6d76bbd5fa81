"""The service's own configuration: where the checkpoint is, how it is laid out on hardware, how the
router batches and what the scoring deployment weighs. `ServiceConfig` is what `serve_app.build_app`
receives as `args` from a Serve config file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from configs.accelerators import ACCELERATORS
from configs.base import StrictModel
from configs.migrations import check_removed_keys
from configs.model import ModelArchConfig
from configs.scoring import ATTRIBUTE_NAMES, DEFAULT_WEIGHTS, ScoringConfig


class ParallelConfig(StrictModel):
    tensor_parallel_size: int = Field(default=1, ge=1, description="Tensor-parallel ranks per stage.")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages (one node each).")
    max_tokens_per_micro_batch: int = Field(
        default=8192, ge=1,
        description="Token budget of one micro-batch (one forward per stage): forest nodes, or sequences x "
                    "longest for the padded layout. Must hold one max-length prompt.",
    )
    batch_layout: Literal["forest", "padded"] = Field(
        default="forest",
        description="`forest`: sequences sharing a token prefix compute it once, packed without padding "
                    "(sharding/forest.py); `padded`: length-sorted, right-padded micro-batches.",
    )
    scatter_gather_activations: bool = Field(
        default=True,
        description="At pipeline_parallel_size > 1 with tensor_parallel_size > 1, each TP rank sends only its "
                    "1/TP slice of the activation to the next stage, which all-gathers it over its TP group.",
    )
    sequence_parallel: bool = Field(
        default=False,
        description="megatron-core sequence parallelism at tensor_parallel_size > 1: layer norms, residual adds and "
                    "dropout-free elementwise work run on 1/TP of each micro-batch's tokens, and a reduce-scatter "
                    "plus an all-gather replace each TP all-reduce. Every micro-batch's token count is padded to a "
                    "multiple of tensor_parallel_size (the pads never reach a scored token). Refused at TP 1 "
                    "(there is nothing to split; megatron-core refuses it too).",
    )
    placement_strategy: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] = Field(
        default="STRICT_SPREAD",
        description="Ray placement-group strategy; STRICT_SPREAD puts each pipeline stage on its own node.",
    )

    @model_validator(mode="after")
    def _check_sequence_parallel(self) -> ParallelConfig:
        if self.sequence_parallel and self.tensor_parallel_size < 2:
            raise ValueError("sequence_parallel needs tensor_parallel_size > 1 (it splits the tokens over the TP "
                             f"ranks); tensor_parallel_size is {self.tensor_parallel_size}")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def check_against(self, arch: ModelArchConfig) -> None:
        """Raises ValueError naming the numbers when the model cannot be split this way."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        checks = [
            ("num_attention_heads", arch.num_attention_heads, tp, "tensor_parallel_size"),
            ("num_query_groups", arch.num_query_groups, tp, "tensor_parallel_size"),
            ("padded_vocab_size", arch.padded_vocab_size, tp, "tensor_parallel_size"),
            ("ffn_hidden_size", arch.ffn_hidden_size, tp, "tensor_parallel_size"),
            ("hidden_size", arch.hidden_size, tp, "tensor_parallel_size"),  # rm_head is row-parallel
            ("num_layers", arch.num_layers, pp, "pipeline_parallel_size"),
        ]
        for name, value, by, by_name in checks:
            if value % by:
                raise ValueError(f"{name} {value} is not divisible by {by_name} {by}")


MODEL_CONTROL_CALLS = 2  # per router replica: readiness checks beside the batches on a model replica
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SimulatedAccelerator = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]


class RuntimeConfig(StrictModel):
    device: Literal["cpu", "cuda", "simulated"] = Field(
        default="cpu",
        description="Where the workers compute. `simulated`: a measuring tool, never a default: no weights are "
                    "loaded and no model is built; each pipeline stage waits the time the cost model "
                    "(sharding/cost_model.py) gives its micro-batch on `simulated_accelerator` and returns "
                    "pseudo-rewards drawn from each sequence's token ids. Every answer says so.",
    )
    simulated_accelerator: SimulatedAccelerator | None = Field(
        default=None,
        description="With device `simulated`: the card whose published numbers (configs/accelerators.py) the cost "
                    "model uses.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Parameter and activation dtype; the reward head is always float32."
    )
    backend: Literal["gloo", "nccl"] = Field(default="gloo", description="torch.distributed backend.")
    gpus_per_node: int = Field(
        default=0, ge=0,
        description="GPUs per node; when > 0 each worker reserves one (logical GPUs on CPU test clusters).",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Ray CPUs reserved per worker actor.")
    torch_threads_per_worker: int | None = Field(
        default=None, ge=1,
        description="torch intra-op threads per worker; null keeps the process default (Ray sets OMP_NUM_THREADS "
                    "to the worker's CPUs).",
    )
    replica_cpus: float = Field(default=0.1, ge=0, description="Ray CPUs of the model replica (in bundle 0).")
    worker_env: dict[str, str] = Field(
        default_factory=dict, description="Environment for worker actors (NCCL_* settings, for example)."
    )
    distributed_timeout_s: float = Field(
        default=600.0, gt=0,
        description="Timeout of the set-up: the process-group rendezvous and the weight loading (no collective "
                    "runs while the weights load; the engine waits for every rank's set-up, a barrier with this "
                    "timeout). Long for large checkpoints (1800 s for the 340B).",
    )
    collective_timeout_s: float = Field(
        default=120.0, gt=0,
        description="Steady-state timeout, once the weights are loaded: a collective or a pipeline transfer "
                    "that waits longer raises on the waiting rank, and a rank whose forward call has run longer "
                    "fails the health check (hung). Separate from distributed_timeout_s, which covers loading.",
    )
    health_check_timeout_s: float = Field(default=10.0, gt=0, description="Deadline for a worker ping.")
    forest_attention: Literal["auto", "branches", "dense", "flex"] = Field(
        default="auto",
        description="Attention kernel of the forest layout: `flex` (torch flex_attention with a block mask from "
                    "subtree_end, compiled; for GPUs), `branches` (one SDPA per branch over its ancestors; CPU), "
                    "`dense` (SDPA with a row x row boolean mask; a reference). `auto`: flex on cuda, branches "
                    "on cpu.",
    )

    @model_validator(mode="after")
    def _check_device(self) -> RuntimeConfig:
        if self.device == "simulated":
            if self.simulated_accelerator is None:
                raise ValueError(f"device simulated needs simulated_accelerator, one of {sorted(ACCELERATORS)}")
            if self.backend != "gloo":
                raise ValueError("device simulated sends its stand-in activations with gloo; set backend gloo")
            if self.dtype == "float32":
                raise ValueError("device simulated models bfloat16 or float16 compute (the table's dense BF16 "
                                 "FLOP/s); set dtype bfloat16")
            return self
        if self.simulated_accelerator is not None:
            raise ValueError(f"simulated_accelerator is set but device is {self.device}; set device simulated "
                             "to simulate, or remove simulated_accelerator")
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("backend nccl needs device cuda; use gloo on cpu")
        # bfloat16 runs on CPU on purpose: it is how the GPU's dtype path (bf16 parameters and activations, fp32
        # norms and head, bf16 all-reduces and pipeline sends) is checked without a GPU, against the float32
        # reference within the bounds README states. float16 stays refused: CPU kernels for it are partial
        # and slow, and no GPU deployment of this project uses it.
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 is not supported on cpu; use float32 or bfloat16")
        if self.device == "cuda" and self.gpus_per_node < 1:
            raise ValueError("device cuda needs gpus_per_node >= 1")
        return self


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of one deployment: replicas between the bounds, scaled toward a load per replica."""

    min_replicas: int = Field(ge=1, description="Fewest replicas kept running.")
    max_replicas: int = Field(ge=1, description="Most replicas started (each model replica needs its own nodes).")
    target_ongoing_requests: float | None = Field(
        default=None, gt=0,
        description="Ongoing requests per replica Serve scales toward. Null: derived (the model: the batches one "
                    "replica holds in flight from all routers; a router: 64 HTTP or handle requests).",
    )
    upscale_delay_s: float = Field(default=30.0, ge=0, description="Load above target this long adds replicas.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Load below target this long removes replicas.")
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window over which Serve averages the load.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


def _one_of_replicas_or_autoscaling(section: StrictModel, name: str) -> None:
    if section.autoscaling is not None and section.num_replicas != 1:
        raise ValueError(f"set {name}.num_replicas or {name}.autoscaling, not both")


class ModelReplicasConfig(StrictModel):
    num_replicas: int = Field(
        default=1, ge=1,
        description="Model replicas; each holds a placement group of its own (two 8-GPU nodes at TP 8 x PP 2) and "
                    "a whole copy of the weights. Routers spread batches over the healthy ones.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Scale the model replicas with load instead of a fixed `num_replicas`."
    )

    @model_validator(mode="after")
    def _check_one(self) -> ModelReplicasConfig:
        _one_of_replicas_or_autoscaling(self, "model")
        return self

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas


class RouterConfig(StrictModel):
    max_tokens_per_batch: int = Field(default=16384, gt=0, description="Token budget of one model batch.")
    long_request_tokens_per_batch: int | None = Field(
        default=None, gt=0,
        description="Computed tokens a long request (one over max_tokens_per_batch, cut across batches anyway) may "
                    "add to one batch, except where a cut would fall inside a prefix its prompts share. Smaller "
                    "batches while it runs mean less work in flight ahead of a request that arrives behind it "
                    "(the role of vLLM's long_prefill_token_threshold). Null: max_tokens_per_batch (no cap).",
    )
    max_conversations_per_request: int = Field(default=256, gt=0, description="Conversations per request.")
    max_input_tokens: int | None = Field(
        default=None, gt=0, description="Per-conversation limit; null uses the model's context length."
    )
    max_batches_in_flight: int | None = Field(
        default=None, ge=1,
        description="Model batches one router replica keeps sent and unanswered per running model replica; the "
                    "next batch is formed when fewer are in flight. Null: pipeline_parallel_size + 1 (every stage "
                    "busy, one batch waiting).",
    )
    num_replicas: int = Field(
        default=1, ge=1,
        description="Router replicas (Serve spreads requests over them); each keeps its own batch queue and its own "
                    "batches in flight to the model replicas.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Scale the router replicas with load instead of a fixed `num_replicas`."
    )
    max_queued_tokens: int = Field(
        default=262144, gt=0,
        description="Tokens one router replica holds waiting for the model; a request that would go past it gets "
                    "503 with Retry-After (a request arriving at an empty queue is always accepted).",
    )

    max_ongoing_requests: int = Field(
        default=512, gt=0,
        description="Requests one router replica holds at once (being read, tokenized, queued or computed); one "
                    "more gets 503 with Retry-After before its body is read or tokenized. Serve delivers 1024 more "
                    "than this to the replica (so it can refuse them at once), and its proxy queues as many before "
                    "it answers a plain 503 itself.",
    )
    max_timeout_s: float = Field(
        default=3600.0, gt=0,
        description="Largest deadline a request may ask for (`timeout_s` in the body, the `X-Request-Timeout` "
                    "header, or the handle's `timeout_s`).",
    )

    # Request limits: each is checked before the work it bounds and answered with a 413 or 400 that names
    # the limit and the value. The defaults fit the largest legitimate request, 256 conversations of 4096
    # tokens (JSON of such text is ~6 MB even with every character \u-escaped; as KServe INT64 tokens 8 MB).
    max_request_bytes: int = Field(
        default=16 * 2**20, gt=0,
        description="Largest request body in bytes, counted as it is read and again after gzip/deflate "
                    "decompression; a bigger one gets 413 without being read further.",
    )
    max_messages_per_conversation: int = Field(default=2048, gt=0, description="Messages per conversation.")
    max_prompts_per_request: int = Field(
        default=1024, gt=0,
        description="Prompts scored for one request: one per conversation, one per assistant turn with "
                    "`turns: \"all\"`, one per response of a best-of-N item, one per KServe row.",
    )
    max_tokens_per_request: int = Field(
        default=256 * 4096, gt=0, description="Tokens scored for one request, over all its prompts (after fitting)."
    )
    tokenizer_threads: int = Field(
        default=2, ge=1, description="Threads of the router's tokenization pool (the event loop never tokenizes)."
    )

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    @model_validator(mode="after")
    def _check_queue(self) -> RouterConfig:
        _one_of_replicas_or_autoscaling(self, "router")
        if self.max_queued_tokens < self.max_tokens_per_batch:
            raise ValueError(
                f"max_queued_tokens {self.max_queued_tokens} is below max_tokens_per_batch {self.max_tokens_per_batch}"
            )
        cap = self.long_request_tokens_per_batch
        if cap is not None and cap > self.max_tokens_per_batch:
            raise ValueError(f"long_request_tokens_per_batch {cap} is above max_tokens_per_batch "
                             f"{self.max_tokens_per_batch}")
        return self


class AuthConfig(StrictModel):
    api_key_file: str | None = Field(
        default=None, min_length=1,
        description="File holding the API key (surrounding whitespace stripped); read once at start.",
    )
    api_key_env: str | None = Field(
        default=None, min_length=1,
        description="Name of the environment variable holding the API key; read once at start.",
    )

    @model_validator(mode="after")
    def _check_one_source(self) -> AuthConfig:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("set at most one of auth.api_key_file and auth.api_key_env")
        return self

    @property
    def enabled(self) -> bool:
        return self.api_key_file is not None or self.api_key_env is not None


class ServiceConfig(StrictModel):
    checkpoint_path: str = Field(
        description="A NeMo checkpoint (extracted .nemo directory or packed .nemo file) or an HF model directory."
    )
    model_name: str = Field(default="reward_model", description="Name reported in responses.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Model parallelism.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device, dtype, backend.")
    model: ModelReplicasConfig = Field(
        default_factory=ModelReplicasConfig, description="How many model replicas, or their autoscaling."
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="Batching and limits.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Reward weights.")
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="Optional API key required as `Authorization: Bearer <key>` on the scoring routes.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_removed_keys(cls, data: Any) -> Any:
        return check_removed_keys(data)  # keys of earlier versions name their replacement (configs/migrations.py)

    @model_validator(mode="after")
    def _check_cross(self) -> ServiceConfig:
        gpus = self.runtime.gpus_per_node
        tp = self.parallel.tensor_parallel_size
        if gpus > 0 and tp > gpus:
            raise ValueError(f"tensor_parallel_size {tp} is larger than gpus_per_node {gpus}")
        return self

    def with_output_names(self, names: tuple[str, ...]) -> ServiceConfig:
        """Fills the scoring names and weights the config leaves unset from the checkpoint's outputs: the
        HelpSteer2 nine keep the default weights; a single output is the scalar itself."""
        given = self.scoring.model_fields_set
        scoring = self.scoring.model_dump()
        if "attribute_names" not in given:
            scoring["attribute_names"] = tuple(names)
        if "weights" not in given:
            if tuple(scoring["attribute_names"]) == ATTRIBUTE_NAMES:
                scoring["weights"] = DEFAULT_WEIGHTS
            elif len(scoring["attribute_names"]) == 1:
                scoring["weights"] = (1.0,)
            else:
                raise ValueError(
                    f"the checkpoint has {len(names)} outputs {list(names)}: set scoring.weights "
                    f"({len(names)} values)"
                )
        return ServiceConfig.model_validate({**self.model_dump(), "scoring": scoring})

    @property
    def simulated(self) -> bool:
        return self.runtime.device == "simulated"

    @property
    def device_label(self) -> str:
        """What computes the scores, as every answer reports it: `cpu`, `cuda`, or `simulated:<card>`."""
        if self.simulated:
            return f"simulated:{self.runtime.simulated_accelerator}"
        return self.runtime.device

    def check_against(self, arch: ModelArchConfig) -> None:
        """Cross-checks against the checkpoint's architecture; raises ValueError naming the numbers."""
        self.parallel.check_against(arch)
        if self.simulated:
            card = ACCELERATORS[self.runtime.simulated_accelerator]
            tp, pp = self.parallel.tensor_parallel_size, self.parallel.pipeline_parallel_size
            weights_gb = arch.max_parameters_per_gpu(tp, pp) * DTYPE_BYTES[self.runtime.dtype] / 1e9
            if weights_gb > card.hbm_gb:
                raise ValueError(
                    f"{weights_gb:.1f} GB of weights per GPU at TP {tp} x PP {pp}; one {card.name} has "
                    f"{card.hbm_gb:.0f} GB of memory"
                )
        n = len(self.scoring.attribute_names)
        if n != arch.num_attributes:
            raise ValueError(f"scoring.attribute_names has {n} names; the reward head has {arch.num_attributes}")
        limit = self.max_input_tokens(arch)
        if self.parallel.max_tokens_per_micro_batch < limit:
            raise ValueError(
                f"parallel.max_tokens_per_micro_batch {self.parallel.max_tokens_per_micro_batch} is below the "
                f"per-conversation limit {limit}"
            )
        for name in ("max_tokens_per_batch", "max_tokens_per_request"):
            if getattr(self.router, name) < limit:
                raise ValueError(
                    f"router.{name} {getattr(self.router, name)} is below the per-conversation limit {limit}"
                )

    @property
    def max_batches_in_flight(self) -> int:
        """Batches one router keeps in flight per running model replica: `router.max_batches_in_flight`,
        defaulting to the pipeline depth + 1."""
        return self.router.max_batches_in_flight or self.parallel.pipeline_parallel_size + 1

    @property
    def model_max_ongoing_requests(self) -> int:
        """The model batches every router may keep in flight on one model replica (the autoscaling target)."""
        return self.router.max_replicas * self.max_batches_in_flight

    @property
    def model_max_ongoing_calls(self) -> int:
        """Serve's `max_ongoing_requests` of a model replica: the batches of `model_max_ongoing_requests` plus
        MODEL_CONTROL_CALLS per router replica, so a readiness check (`check_health` through the handle) is
        never queued behind batches when the replica is saturated."""
        return self.model_max_ongoing_requests + self.router.max_replicas * MODEL_CONTROL_CALLS

    def max_input_tokens(self, arch: ModelArchConfig) -> int:
        limit = self.router.max_input_tokens or arch.max_position_embeddings
        if limit > arch.max_position_embeddings:
            raise ValueError(
                f"router.max_input_tokens {limit} exceeds the model's max_position_embeddings "
                f"{arch.max_position_embeddings}"
            )
        return limit
