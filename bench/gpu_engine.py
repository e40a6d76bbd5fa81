"""GPU benchmark of the project's engine path on the Nemotron-15B-like shape of REFERENCE.md section 8.

    python bench/gpu_engine.py                                   # one GPU: bf16, CUDA, NCCL, TP1 PP1
    python bench/gpu_engine.py --out "$OUT/gpu_engine.json"      # on the device machine
    python bench/gpu_engine.py --device cpu --dtype float32 --backend gloo --tiny   # CPU dry run of the code

Same workload and accounting as ../shared/bench/hf_baseline.py (REFERENCE.md section 8): 48 sequences with
lengths uniform in [256, 2048] (seeded), prefill only, a 9-output reward head, random weights, tokens/s and
MFU counting real (unpadded) tokens only, against a bf16 matmul ceiling measured in the same run, with
hf_baseline.py's FLOP formula.

What runs is the project's own code, not a re-implementation:
  * `sharding.process_group.init_model_parallel` (world size 1, TP 1, PP 1),
  * `sharding.model.build_stage_model` (megatron-core GPTModel, local spec with
    `SDPACoreAttention` and the project norm, no LM output layer, float32 `rm_head` at the last real token),
  * `sharding.micro_batches.make_micro_batches` (length-sorted, right-padded micro-batches of 16),
  * the forward loop of `sharding.worker.ModelWorker.forward` for a single (first = last) stage: per
    micro-batch host->device copy of the tokens and lengths, `model(ids, lengths)`, rewards back to host.
No checkpoint is read: parameters are drawn in place (normal, std 0.02; norms zero-centred at 0) since
only speed is measured. The Ray actor hop and the router are not part of this number (see
bench/service_vs_engine.py for those on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NEMOTRON_15B_LIKE = dict(num_layers=32, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
                         num_query_groups=8, padded_vocab_size=256000)
TINY = dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            padded_vocab_size=1024)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    p.add_argument("--tiny", action="store_true",
                   help="Tiny shape (2 layers, hidden 128) and lengths in [16, 128]: checks the code path, not speed.")
    p.add_argument("--nseq", type=int, default=48, help="Sequences (REFERENCE.md section 8: 48).")
    p.add_argument("--min-len", type=int, help="Shortest sequence (default 256; 16 with --tiny).")
    p.add_argument("--max-len", type=int, help="Longest sequence (default 2048; 128 with --tiny).")
    p.add_argument("--mb", type=int, default=16, help="Micro-batch size (parallel.micro_batch_size).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="Untimed passes over all micro-batches.")
    p.add_argument("--reps", type=int, default=3, help="Timed passes; the median is reported.")
    p.add_argument("--matmul-n", type=int, help="Square matmul size of the ceiling (default 8192; 512 with --tiny).")
    p.add_argument("--out", help="JSON output (default bench/results/gpu_engine.json; with --tiny "
                                 "bench/results/gpu_engine_tiny.json, so a dry run never overwrites a GPU result).")
    return p.parse_args()


def lengths_for(nseq: int, lo: int, hi: int, seed: int) -> list[int]:
    """Uniform in [lo, hi], drawn exactly as hf_baseline.py draws them (torch.randint on a seeded CPU
    generator), so both benchmarks score the same 48 lengths."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (nseq,), generator=g).tolist()


def model_flops(shape: dict[str, int], lengths: list[int]) -> float:
    """hf_baseline.py's formula: 2 FLOPs per multiply-add over the QKV/output projections and the
    (non-gated, 2-matrix) MLP per token, plus causal attention 2*L*h*n^2 per sequence (QK^T and AV at
    half the square). Embedding lookup and the 9-output head are not counted."""
    h, layers, f = shape["hidden_size"], shape["num_layers"], shape["ffn_hidden_size"]
    kvd = h // shape["num_attention_heads"] * shape["num_query_groups"]
    mlp = 2 * h * f
    per_tok = 2 * layers * (h * h * 2 + 2 * h * kvd + mlp)
    return float(sum(per_tok * n + 2 * layers * h * n * n for n in lengths))


def main() -> None:
    args = parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_engine.py: CUDA is not available on this machine (torch "
                 f"{torch.__version__}); this benchmark needs one GPU. For a CPU dry run of the code path use: "
                 "python bench/gpu_engine.py --device cpu --dtype float32 --backend gloo --tiny")

    from configs.model import ModelArchConfig, TokenizerRef
    from configs.service import RuntimeConfig
    from sharding.micro_batches import make_micro_batches
    from sharding.model import DTYPES, build_stage_model
    from sharding.process_group import destroy_model_parallel, free_port, init_model_parallel

    shape = TINY if args.tiny else NEMOTRON_15B_LIKE
    lo = args.min_len if args.min_len is not None else (16 if args.tiny else 256)
    hi = args.max_len if args.max_len is not None else (128 if args.tiny else 2048)
    matmul_n = args.matmul_n or (512 if args.tiny else 8192)
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype, backend=args.backend,
                            gpus_per_node=1 if args.device == "cuda" else 0)
    arch = ModelArchConfig(
        **shape,
        kv_channels=None,
        normalization="layernorm1p",
        layernorm_epsilon=1e-5,
        activation="squared-relu",
        position_embedding_type="rope",
        rotary_percentage=0.5,
        rotary_base=10000,
        bias=False,
        share_embeddings_and_output_weights=False,
        max_position_embeddings=4096,
        num_attributes=9,
        rm_head_bias=True,
        tokenizer=TokenizerRef(library="sentencepiece", model="nemo:unused.model"),
    )
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def bench(fn, warm: int, reps: int) -> list[float]:
        for _ in range(warm):
            fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return times

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, {device_name}, {args.dtype}, backend {args.backend}, "
          f"shape {'tiny' if args.tiny else 'nemotron15b-like'}", flush=True)

    # Matmul ceiling, as hf_baseline.py measures it (8192^3, 3 warm-up, 10 timed, median).
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=dtype)
    b = torch.randn_like(a)
    mm_times = bench(lambda: a @ b, 3, 10)
    matmul_tflops = 2 * matmul_n**3 / statistics.median(mm_times) / 1e12
    print(f"matmul {matmul_n}^3 {args.dtype}: {matmul_tflops:.1f} TFLOP/s", flush=True)
    del a, b

    init_model_parallel(runtime, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                        tp=1, pp=1, local_rank=0)
    result: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        model = build_stage_model(arch, runtime, tp=1, pp=1, pp_rank=0)
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "layernorm" in name or name.endswith(".bias"):
                    param.zero_()  # layernorm1p: weight stored zero-centred, so 0 is gamma 1; beta 0
                else:
                    param.normal_(0.0, 0.02, generator=gen)
        sync()
        build_s = time.perf_counter() - t0
        num_params = sum(p.numel() for p in model.parameters())
        print(f"model: {num_params / 1e9:.2f}B parameters built and drawn in {build_s:.1f}s", flush=True)

        lengths = lengths_for(args.nseq, lo, hi, args.seed)
        tok_gen = torch.Generator().manual_seed(args.seed + 1)
        token_lists = [torch.randint(1, arch.padded_vocab_size, (n,), generator=tok_gen).tolist() for n in lengths]
        micro_batches, order = make_micro_batches(token_lists, args.mb)
        real_tokens = sum(lengths)
        padded_tokens = sum(int(t.shape[0] * t.shape[1]) for t, _ in micro_batches)

        outputs: list = []

        def forward_all() -> None:
            # sharding.worker.ModelWorker.forward, single stage (first and last), TP rank 0.
            outs = []
            with torch.no_grad():
                for tokens, lens_np in micro_batches:
                    lens = torch.from_numpy(lens_np).to(dev)
                    ids = torch.from_numpy(tokens).to(dev)
                    out = model(ids, lens)
                    outs.append(out.float().cpu().numpy())
            outputs[:] = outs

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = bench(forward_all, args.warmup, args.reps)
        t = statistics.median(times)
        import numpy as np

        rewards = np.concatenate(outputs, axis=0)
        assert rewards.shape == (args.nseq, arch.num_attributes), rewards.shape
        finite = bool(np.isfinite(rewards).all())
        flops = model_flops(shape, lengths)
        tflops = flops / t / 1e12
        result = {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "system": "project engine path: megatron-core GPTModel local spec + the project norm (layernorm1p) + SDPACoreAttention, "
                      "make_micro_batches (length-sorted), ModelWorker forward loop",
            "device": device_name,
            "torch": torch.__version__,
            "dtype": args.dtype,
            "backend": args.backend,
            "shape": {"name": "tiny" if args.tiny else "nemotron15b-like", **shape, "head_dim": arch.head_dim,
                      "activation": arch.activation, "normalization": arch.normalization,
                      "rotary_percentage": arch.rotary_percentage, "num_attributes": arch.num_attributes},
            "num_params": num_params,
            "nseq": args.nseq,
            "length_range": [lo, hi],
            "micro_batch_size": args.mb,
            "micro_batches": len(micro_batches),
            "real_tokens": real_tokens,
            "padded_tokens": padded_tokens,
            "padding_overhead": round(padded_tokens / real_tokens - 1, 4),
            "matmul_n": matmul_n,
            "matmul_tflops": round(matmul_tflops, 2),
            "pass_s": [round(x, 4) for x in times],
            "s": round(t, 4),
            "tok_s": round(real_tokens / t, 1),
            "tflops": round(tflops, 2),
            "mfu": round(tflops / matmul_tflops, 4),
            "flop_formula": "hf_baseline.py: sum_n 2L(2h^2 + 2h*kvd + 2hf)*n + 2Lh*n^2, real tokens only",
            "rewards_finite": finite,
            "build_s": round(build_s, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
            "lengths": lengths,
            "reference": "REFERENCE.md section 8: megatron-core + SDPA core attention, sorted: 16,756 tokens/s, "
                         "56% MFU (H100, ceiling 769 TFLOP/s)",
        }
    finally:
        destroy_model_parallel()

    print(f"engine: {result['tok_s']:,.1f} tokens/s (real tokens), {result['tflops']:.1f} TFLOP/s, "
          f"MFU {100 * result['mfu']:.1f}% of the measured {matmul_tflops:.1f} TFLOP/s ceiling; "
          f"{args.nseq} seqs, {real_tokens} tokens in {len(micro_batches)} micro-batches of {args.mb} "
          f"(padding +{100 * result['padding_overhead']:.1f}%), passes {result['pass_s']} s", flush=True)
    print("RESULT", json.dumps({k: v for k, v in result.items() if k != "lengths"}), flush=True)
    out = Path(args.out or REPO / "bench" / "results" / ("gpu_engine_tiny.json" if args.tiny else "gpu_engine.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
