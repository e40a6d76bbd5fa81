"""The benchmark phase of `python -m bench.gpu_check`: the engine beside transformers on one GPU.

Shape "Nemotron-15B-like": hidden 6144, 32 layers, 48 heads, 8 KV groups, ffn 24576, squared-ReLU,
zero-centred LayerNorm (layernorm1p), RoPE on half the head dim, vocab 256000, 9 outputs; ~14.1B
parameters, ~28 GB in bf16. Random weights drawn in place (normal, std 0.02; norm weights and biases 0,
i.e. gamma 1 for layernorm1p): only speed is measured, no checkpoint is read. With --dry-run: 2 layers,
hidden 128, float32 on the CPU; those numbers only show that the code runs.

Workload: 48 sequences, lengths uniform in [256, 2048] (torch.randint on a CPU generator seeded 0; tiny:
[16, 128]), token ids uniform in [1, vocab) from a second generator. Every system scores the same token
lists, one after another in this process (transformers first, the forest layout last: its flex attention
compiles on the first pass, and a phase that runs out of time keeps what finished), each with its own
peak-memory count:

  engine_padded         the engine's padded layout (sorted by length, right-padded micro-batches) and the
                        ModelWorker's forward loop (under no_grad, rewards concatenated on the device, one
                        copy to the host per pass) on `sharding.model.build_stage_model` at TP1 PP1;
  engine_forest         the same model at the forest layout (`sharding.forest`: prefix tries packed into
                        rows, no padding), when the tree has it (`parallel.batch_layout`).
                        With `parallel.batch_layout`, both layouts come from the engine's own planning
                        (`sharding.micro_batches.plan_micro_batches` with `parallel.batch_layout` and
                        `parallel.max_tokens_per_micro_batch` 16384) and inputs (`sharding.model.
                        micro_batch_inputs`; the forest kernel is `runtime.forest_attention` "auto": flex
                        attention on CUDA).
  transformers_arrival  transformers' NemotronForSequenceClassification (SDPA attention) on the same shape,
                        micro-batches of 16 in arrival order, right-padded, with an attention mask;
  transformers_sorted   the same, the sequences sorted by length (longest first) before they are cut
                        into batches of 16.

Before each engine layout's passes, the worker's setup warm-up (`sharding.warmup`, CUDA only: null on the dry
run) is timed (`warm_up_s`); after them, the forest layout runs once more with flex attention and once with
dense masked SDPA (`flex_vs_dense_max_abs_diff`). Sequence parallelism needs TP > 1: not run on one GPU
(`sequence_parallel` says so).

Timing: 1 warm-up and 3 timed passes over all 48 sequences, median. tokens/s counts real tokens only.
TFLOP/s counts the useful FLOPs: `sharding.cost_model.stage_cost` (the one accounting, which the simulated
accelerator uses too) of each sequence alone at TP1 PP1 (`padded_work([n])`: real tokens, causal attention,
the reward head), so padding and repeated prefixes earn nothing; MFU divides it by a matmul ceiling measured in
the same process (8192^3, 3 warm-up, 10 timed, median). Peak memory: torch.cuda.max_memory_allocated from the
start of its passes (weights included) to their end.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

NEMOTRON_15B_LIKE = dict(num_layers=32, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
                         num_query_groups=8, padded_vocab_size=256000)
TINY = dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            padded_vocab_size=1024)
SETTINGS = {
    False: dict(name="nemotron15b-like", shape=NEMOTRON_15B_LIKE, device="cuda", dtype="bfloat16", backend="nccl",
                length_range=(256, 2048), matmul_n=8192),
    True: dict(name="tiny", shape=TINY, device="cpu", dtype="float32", backend="gloo", length_range=(16, 128),
               matmul_n=512),
}
NSEQ = 48
MICRO_BATCH_SIZE = 16  # transformers' batches of sequences
MAX_TOKENS_PER_MICRO_BATCH = 16384  # parallel.max_tokens_per_micro_batch of both engine layouts


def forest_layout_available() -> bool:
    """Whether this tree's engine has the forest layout (the config field `parallel.batch_layout`). Asked of
    the config, not by looking `sharding.forest` up: an editable install of another checkout can answer that."""
    from configs.service import ParallelConfig

    return "batch_layout" in ParallelConfig.model_fields

SEQUENCE_PARALLEL_NOTE = (
    "not run: one GPU is TP1, and megatron-core refuses sequence_parallel without tensor parallelism (so does "
    "parallel.sequence_parallel); SP on vs off is checked at TP2 and TP2xPP2 on CPU with gloo "
    "(tests/integration/test_gpu_paths_cpu.py), its saving estimated by sharding.cost_model.sequence_parallel_saving")
SEED = 0
WARMUP_PASSES = 1
TIMED_PASSES = 3
FLOP_FORMULA = ("sharding.cost_model.stage_cost(arch, padded_work([n]), tp=1, pp=1, stage=0).flops summed over "
                "the sequences (each alone: real tokens only)")


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def bench_arch(shape: dict[str, int]):
    """The benchmark's ModelArchConfig: Nemotron-4's layer shape at `shape`'s sizes."""
    from configs.model import ModelArchConfig, TokenizerRef

    return ModelArchConfig(**shape, kv_channels=None, normalization="layernorm1p", layernorm_epsilon=1e-5,
                           activation="squared-relu", position_embedding_type="rope", rotary_percentage=0.5,
                           rotary_base=10000, bias=False, share_embeddings_and_output_weights=False,
                           max_position_embeddings=4096, num_attributes=9, rm_head_bias=True,
                           tokenizer=TokenizerRef(library="sentencepiece", model="nemo:unused.model"))


def useful_flops(arch, lengths: Sequence[int], dtype_bytes: int) -> float:
    """FLOPs of scoring each sequence alone, from the project's one cost accounting."""
    from sharding.cost_model import padded_work, stage_cost

    return float(sum(stage_cost(arch, padded_work([n]), tp=1, pp=1, stage=0, dtype_bytes=dtype_bytes).flops
                     for n in lengths))


def workload(lo: int, hi: int, vocab: int) -> list[list[int]]:
    lengths = torch.randint(lo, hi + 1, (NSEQ,), generator=torch.Generator().manual_seed(SEED)).tolist()
    tokens = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(1, vocab, (n,), generator=tokens).tolist() for n in lengths]


def draw_weights(model: torch.nn.Module, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)


def engine_plan(token_lists: Sequence[Sequence[int]], layout: str) -> tuple[list, np.ndarray]:
    """The engine's micro-batches of the batch at `layout` and `order` (output row r is sequence order[r])."""
    from configs.service import ParallelConfig
    from sharding.micro_batches import plan_micro_batches

    return plan_micro_batches(token_lists, ParallelConfig(batch_layout=layout,
                                                          max_tokens_per_micro_batch=MAX_TOKENS_PER_MICRO_BATCH))


def engine_inputs(micro_batch, runtime, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(input ids, keyword arguments of the model) of one micro-batch, as the worker's first stage builds them."""
    from sharding.model import micro_batch_inputs

    return micro_batch_inputs(micro_batch, runtime, device, True)


def micro_batch_tokens(micro_batch) -> int:
    return int(micro_batch.num_tokens) if hasattr(micro_batch, "num_tokens") else int(micro_batch[0].size)


def padded_batches(token_lists: Sequence[Sequence[int]], groups: Sequence[np.ndarray]) -> list[tuple]:
    """(tokens int64 [b, s] right-padded with 0, lengths int64 [b], indices [b]) per group."""
    out = []
    for idx in groups:
        lengths = np.array([len(token_lists[i]) for i in idx], dtype=np.int64)
        tokens = np.zeros((len(idx), int(lengths.max())), dtype=np.int64)
        for row, i in enumerate(idx):
            tokens[row, : lengths[row]] = token_lists[i]
        out.append((tokens, lengths, np.asarray(idx)))
    return out


class Bench:
    """Times systems on one device and collects their entries (the keys of bench.gpu_check.SYSTEM_KEYS)."""

    def __init__(self, device: torch.device, shape: dict[str, int], token_lists: list[list[int]], dtype_bytes: int):
        self.device, self.shape, self.token_lists = device, shape, token_lists
        self.lengths = [len(t) for t in token_lists]
        self.arch = bench_arch(shape)
        self.flops = useful_flops(self.arch, self.lengths, dtype_bytes)
        self.matmul_tflops: float | None = None
        self.rewards: dict[str, np.ndarray] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def times(self, fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - start)
        return out

    def ceiling(self, n: int, dtype: torch.dtype) -> float:
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn_like(a)
        self.matmul_tflops = 2 * n**3 / statistics.median(self.times(lambda: a @ b, 3, 10)) / 1e12
        return self.matmul_tflops

    def measure(self, name: str, forward: Callable[[], np.ndarray], computed_tokens: int, build_s: float) -> dict:
        """`forward` scores all sequences once and returns float32 rewards [NSEQ, 9] in arrival order. Peak
        memory counts from here: the weights (allocated) plus what the passes take."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        outputs: list[np.ndarray] = []
        pass_s = self.times(lambda: outputs.append(forward()), WARMUP_PASSES, TIMED_PASSES)
        seconds = statistics.median(pass_s)
        self.rewards[name] = outputs[-1]
        tflops = self.flops / seconds / 1e12
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        entry = {"tok_s": round(sum(self.lengths) / seconds, 1), "tflops": significant(tflops),
                 "mfu": round(tflops / self.matmul_tflops, 4), "s": round(seconds, 4),
                 "pass_s": [round(x, 4) for x in pass_s], "computed_tokens": computed_tokens,
                 "peak_memory_gib": None if peak is None else round(peak, 2),
                 "rewards_finite": bool(np.isfinite(outputs[-1]).all()), "build_s": round(build_s, 2)}
        print(f"{name}: {entry['tok_s']:,.0f} tokens/s, MFU {100 * entry['mfu']:.1f}%, passes {entry['pass_s']} s, "
              f"peak {entry['peak_memory_gib']} GiB", flush=True)
        return entry


def warm_up_stage(model, arch, runtime, layout: str) -> float | None:
    """The worker's setup warm-up (`sharding.warmup`) of this layout: seconds, None where it does not run (CPU)."""
    from configs.service import ParallelConfig
    from sharding.warmup import warm_up
    from sharding.worker import ModelStage

    parallel = ParallelConfig(batch_layout=layout, max_tokens_per_micro_batch=MAX_TOKENS_PER_MICRO_BATCH)
    seconds = warm_up(ModelStage(model, arch, runtime, parallel), parallel, first_stage=True)
    return None if seconds is None else round(seconds, 2)


def flex_vs_dense(model, runtime, bench: Bench) -> float:
    """Max abs difference of the forest layout's rewards with flex attention against dense masked SDPA."""
    rewards = {}
    micro_batches, _ = engine_plan(bench.token_lists, "forest")
    for kernel in ("flex", "dense"):
        kernel_runtime = runtime.model_copy(update={"forest_attention": kernel})
        outs = []
        with torch.no_grad():
            for micro_batch in micro_batches:
                ids, kwargs = engine_inputs(micro_batch, kernel_runtime, bench.device)
                outs.append(model(ids, **kwargs))
        rewards[kernel] = torch.cat(outs).float().cpu().numpy()
    return float(np.abs(rewards["flex"] - rewards["dense"]).max())


def engine_systems(bench: Bench, settings: dict, record: Callable[[str, dict], None], warm: dict,
                   flex_dense: list) -> None:
    from configs.service import RuntimeConfig
    from sharding.model import build_stage_model
    from sharding.process_group import destroy_model_parallel, free_port, init_model_parallel

    arch = bench.arch
    runtime = RuntimeConfig(device=settings["device"], dtype=settings["dtype"], backend=settings["backend"],
                            gpus_per_node=1 if settings["device"] == "cuda" else 0)
    init_model_parallel(runtime, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), tp=1, pp=1)
    try:
        start = time.perf_counter()
        model = build_stage_model(arch, runtime, tp=1, pp=1, pp_rank=0)
        draw_weights(model, bench.device)
        bench.sync()
        build_s = time.perf_counter() - start
        for layout in ("padded", "forest"):
            name = f"engine_{layout}"
            micro_batches, order = engine_plan(bench.token_lists, layout)
            warm[layout] = warm_up_stage(model, arch, runtime, layout)

            def forward(micro_batches=micro_batches, order=order) -> np.ndarray:  # ModelWorker.forward, one stage
                outs = []
                with torch.no_grad():
                    for micro_batch in micro_batches:
                        ids, kwargs = engine_inputs(micro_batch, runtime, bench.device)
                        outs.append(model(ids, **kwargs))
                    rewards = torch.cat(outs).float().cpu().numpy()
                restored = np.empty_like(rewards)
                restored[order] = rewards
                return restored

            computed = sum(micro_batch_tokens(mb) for mb in micro_batches)
            record(name, bench.measure(name, forward, computed, build_s))
        flex_dense[0] = flex_vs_dense(model, runtime, bench)
        del model
    finally:
        destroy_model_parallel()


def transformers_systems(bench: Bench, settings: dict, record: Callable[[str, dict], None]) -> None:
    if importlib.util.find_spec("transformers") is None:
        for name in ("transformers_arrival", "transformers_sorted"):
            record(name, {"skipped": "transformers is not installed"})
        return
    from transformers import NemotronConfig, NemotronForSequenceClassification

    from sharding.model import DTYPES

    shape = settings["shape"]
    config = NemotronConfig(vocab_size=shape["padded_vocab_size"], hidden_size=shape["hidden_size"],
                            intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
                            num_attention_heads=shape["num_attention_heads"],
                            num_key_value_heads=shape["num_query_groups"],
                            head_dim=shape["hidden_size"] // shape["num_attention_heads"], partial_rotary_factor=0.5,
                            hidden_act="relu2", norm_eps=1e-5, max_position_embeddings=4096, num_labels=9,
                            pad_token_id=0)
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    with torch.device(bench.device):
        model = NemotronForSequenceClassification._from_config(config, dtype=DTYPES[settings["dtype"]],
                                                               attn_implementation="sdpa").eval()
    draw_weights(model, bench.device)
    bench.sync()
    build_s = time.perf_counter() - start
    arrival = np.arange(NSEQ)
    by_length = np.argsort(-np.asarray(bench.lengths, dtype=np.int64), kind="stable")
    for name, arranged in (("transformers_arrival", arrival), ("transformers_sorted", by_length)):
        groups = [arranged[i:i + MICRO_BATCH_SIZE] for i in range(0, NSEQ, MICRO_BATCH_SIZE)]
        batches = padded_batches(bench.token_lists, groups)
        order = np.concatenate([idx for _, _, idx in batches])

        def forward(batches=batches, order=order) -> np.ndarray:
            outs = []
            with torch.no_grad():
                for tokens, lengths, _ in batches:
                    mask = torch.arange(tokens.shape[1]).unsqueeze(0) < torch.from_numpy(lengths).unsqueeze(1)
                    outs.append(model(input_ids=torch.from_numpy(tokens).to(bench.device),
                                      attention_mask=mask.to(bench.device, torch.int64)).logits)
                rewards = torch.cat(outs).float().cpu().numpy()
            restored = np.empty_like(rewards)
            restored[order] = rewards
            return restored

        computed = sum(int(t.size) for t, _, _ in batches)
        record(name, bench.measure(name, forward, computed, build_s))
    del model


def ratio(systems: dict, a: str, b: str) -> float | None:
    if "tok_s" not in systems.get(a, {}) or "tok_s" not in systems.get(b, {}):
        return None
    return round(systems[a]["tok_s"] / systems[b]["tok_s"], 4)


def run_benchmark(dry_run: bool, write: Callable[[dict], None]) -> bool:
    """Measures every system, calling `write` with the result so far after each one. True when every
    measured system's rewards are finite and the engine's padded layout was measured."""
    from sharding.model import DTYPES

    settings = SETTINGS[dry_run]
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"CUDA is not available to torch {torch.__version__}; use --dry-run on a CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if settings["device"] == "cuda" else torch.device("cpu")
    lo, hi = settings["length_range"]
    from configs.service import DTYPE_BYTES

    bench = Bench(device, settings["shape"], workload(lo, hi, settings["shape"]["padded_vocab_size"]),
                  DTYPE_BYTES[settings["dtype"]])
    ceiling = bench.ceiling(settings["matmul_n"], DTYPES[settings["dtype"]])
    print(f"{torch.cuda.get_device_name() if settings['device'] == 'cuda' else platform.processor() or 'cpu'}: "
          f"matmul {settings['matmul_n']}^3 {settings['dtype']} {ceiling:.1f} TFLOP/s", flush=True)
    result = {"device": settings["device"], "dtype": settings["dtype"],
              "shape": {"name": settings["name"], **settings["shape"], "activation": "squared-relu",
                        "normalization": "layernorm1p", "rotary_percentage": 0.5, "num_attributes": 9},
              "nseq": NSEQ, "length_range": [lo, hi], "lengths": bench.lengths, "real_tokens": sum(bench.lengths),
              "micro_batching": {"transformers_sequences_per_batch": MICRO_BATCH_SIZE,
                                 "engine_max_tokens_per_micro_batch": MAX_TOKENS_PER_MICRO_BATCH,
                                 "engine_sequences_per_micro_batch": None},
              "matmul_n": settings["matmul_n"],
              "matmul_tflops": significant(ceiling), "flop_formula": FLOP_FORMULA, "systems": {},
              "forest_vs_padded_max_abs_diff": None, "engine_padded_over_transformers_sorted": None,
              "engine_forest_over_transformers_sorted": None, "warm_up_s": None,
              "flex_vs_dense_max_abs_diff": None, "sequence_parallel": SEQUENCE_PARALLEL_NOTE}
    write(result)

    def record(name: str, entry: dict) -> None:
        result["systems"][name] = entry
        if "engine_forest" in bench.rewards and "engine_padded" in bench.rewards:
            diff = np.abs(bench.rewards["engine_forest"] - bench.rewards["engine_padded"]).max()
            result["forest_vs_padded_max_abs_diff"] = float(diff)
        for layout in ("padded", "forest"):
            key = f"engine_{layout}_over_transformers_sorted"
            result[key] = ratio(result["systems"], f"engine_{layout}", "transformers_sorted")
        write(result)

    # transformers first, the forest layout (whose flex attention compiles on its first pass) last: a phase
    # that runs out of time still leaves the comparison of what finished.
    transformers_systems(bench, settings, record)
    warm, flex_dense = {}, [None]
    engine_systems(bench, settings, record, warm, flex_dense)
    result.update(warm_up_s=warm, flex_vs_dense_max_abs_diff=flex_dense[0])
    write(result)
    measured = [s for s in result["systems"].values() if "skipped" not in s]
    return "tok_s" in result["systems"]["engine_padded"] and all(s["rewards_finite"] for s in measured)
