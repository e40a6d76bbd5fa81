"""Checkpoint loading: load time and peak RSS per worker for a ~1B-parameter checkpoint in each format.

    python bench/checkpoint_load.py [--tp 2] [--workdir /tmp] [--formats zarr,zarr-tar,torch_dist,torch_dist-tar]

Generates, in a temporary folder, a Nemotron-4-architecture reward checkpoint of ~1.06B stored parameters
(20 layers, hidden 2048, FFN 8192, 16 heads / 8 query groups, vocab 32768; ~0.99B loaded, the rest is the
LM output layer a reward model never reads) in the released layout: zarr, bf16, TP 8 chunks. It then
measures, one format at a time (and deletes each when done):

  zarr            the released layout, extracted directory
  zarr-tar        the same packed as a .nemo (uncompressed tar), read in place
  torch_dist      converted by `python -m sharding.checkpoints convert` (keeps the TP 8 chunks)
  torch_dist-tar  that, packed

Each measurement is a fresh gloo world of `--tp` processes on this machine (TP x PP1, CPU), one per rank,
loading into float32 parameters (the service on CPU) and into bfloat16 ones (what a GPU worker holds), after evicting the checkpoint's files from the page
cache (posix_fadvise DONTNEED). Accounting, per rank:

  baseline   RSS after imports and joining the process group, before the model is built
  peak       the process's peak RSS (getrusage ru_maxrss) after the load
  shard      bytes of this rank's parameters (what it must end up holding)
  ratio      (peak - baseline) / shard; the bound is 1.3. Model construction allocates the parameters
             without touching them, so they become resident as the load fills them; everything above
             1.0 is what the loader holds transiently (mapped chunk pages, a torch_dist item being read).

Also recorded: each rank's bytes read per zarr key against the tensor's full size (no rank reads a whole
TP-split tensor), and a checksum of every rank's parameters, equal across formats. Writes
bench/results/checkpoint_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"num_layers": 20, "hidden_size": 2048, "ffn_hidden_size": 8192, "num_attention_heads": 16,
         "num_query_groups": 8}
VOCAB = 32768
FORMATS = ("zarr", "zarr-tar", "torch_dist", "torch_dist-tar")
RATIO_BOUND = 1.3


# ------------------------------------------------------------------------------------- generation


def generate_zarr_checkpoint(folder: Path, seed: int = 0) -> dict:
    """The released layout at the bench shape, random bf16 values, written chunk by chunk."""
    from tests.checkpoint_writers import (
        nemotron_model_config,
        reference_shapes,
        tp_chunks,
        write_backend_files,
        write_extra_state,
        write_model_config,
        write_tokenizer,
        write_zarr_array,
    )

    folder.mkdir(parents=True)
    tokenizer = write_tokenizer(folder)
    config = nemotron_model_config(tokenizer, SHAPE)
    config["padded_vocab_size"] = VOCAB  # the demo tokenizer is small; the embedding is not
    write_model_config(folder, config)
    weights = folder / "model_weights"
    rng = np.random.default_rng(seed)
    stored = 0

    def random_bf16(box):
        shape = [s.stop - s.start for s in box]
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        return (values.view(np.uint32) >> 16).astype("<u2")  # bf16 by truncation

    for key, shape in reference_shapes(SHAPE, VOCAB).items():
        write_zarr_array(weights / f"model.{key}", shape, tp_chunks(key, shape), "bfloat16", random_bf16)
        stored += int(np.prod(shape))
    write_extra_state(weights, SHAPE["num_layers"])
    write_backend_files(weights, "zarr")
    return {"stored_parameters": stored}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evict_page_cache(path: Path) -> None:
    """Flushes and drops this checkpoint's pages from the page cache (no effect on other files)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------- one rank


def measure_rank(rank: int, tp: int, path: str, dtype: str) -> dict:
    """Runs inside a fresh process of the gloo world (see tests.gloo_world.run_world)."""
    import gc
    import resource

    import psutil
    import torch
    import torch.distributed as dist

    from configs.service import RuntimeConfig
    from sharding.checkpoints.nemo_weights import load_weights
    from sharding.model import build_stage_model
    from sharding.checkpoints.nemo import NemoCheckpoint

    proc = psutil.Process()
    checkpoint = NemoCheckpoint.open(path)
    arch = checkpoint.arch
    gc.collect()
    baseline = proc.memory_info().rss
    # bfloat16 parameters on CPU are outside the service's config (it computes in float32 on CPU), but
    # loading into them is what a GPU worker's load does; built here without validation for the measurement.
    runtime = RuntimeConfig.model_construct(**{**RuntimeConfig().model_dump(), "dtype": dtype,
                                               "torch_threads_per_worker": 1})
    model = build_stage_model(arch, runtime, tp=tp, pp=1, pp_rank=0)
    after_build = proc.memory_info().rss
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    started = time.perf_counter()
    report = load_weights(model, checkpoint.weights_dir)
    load_s = time.perf_counter() - started
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after_load = proc.memory_info().rss
    with torch.no_grad():
        checksum = float(sum(p.double().sum().item() for p in model.parameters()))
    read = None
    if report.zarr_stats is not None:
        from sharding.checkpoints.dist_readers import tensor_infos

        infos = tensor_infos(checkpoint.weights_files)
        read = {k: round(v / infos[k].nbytes, 4) for k, v in report.zarr_stats.bytes_by_key.items()}
    return {
        "rank": rank,
        "load_s": round(load_s, 2),
        "shard_bytes": shard,
        "baseline_rss": baseline,
        "model_built_rss_delta": after_build - baseline,
        "rss_after_load_delta": after_load - baseline,
        "peak_rss": peak,
        "peak_over_baseline": peak - baseline,
        "ratio": round((peak - baseline) / shard, 3),
        "checksum": checksum,
        "fraction_of_each_tensor_read": read,
    }


# ---------------------------------------------------------------------------------------------- main


def run_format(name: str, path: Path, tp: int, dtype: str) -> dict:
    from tests.gloo_world import run_world

    evict_page_cache(path)
    started = time.perf_counter()
    ranks = run_world(tp, tp, 1, measure_rank, tp, str(path), dtype, timeout_s=1800)
    wall = time.perf_counter() - started
    worst = max(r["ratio"] for r in ranks)
    split_fraction = None
    if ranks[0]["fraction_of_each_tensor_read"] is not None:
        from sharding.checkpoints.cli import TP_SPLIT_AXIS

        split = [f for r in ranks for k, f in r["fraction_of_each_tensor_read"].items()
                 if TP_SPLIT_AXIS.get(k.removeprefix("model.")) is not None]
        split_fraction = max(split)
    row = {
        "format": name,
        "parameter_dtype": dtype,
        "checkpoint_bytes": folder_bytes(path),
        "world_wall_s": round(wall, 2),
        "max_load_s": max(r["load_s"] for r in ranks),
        "max_ratio": worst,
        "within_bound": worst <= RATIO_BOUND,
        "max_fraction_of_a_split_tensor_read_by_a_rank": split_fraction,
        "ranks": ranks,
    }
    gib = 1024**3
    print(f"{name:<15} {dtype:<8} load {row['max_load_s']:6.2f} s (world {wall:5.1f} s)  " + "  ".join(
        f"rank {r['rank']}: shard {r['shard_bytes'] / gib:.2f} GiB, peak-baseline {r['peak_over_baseline'] / gib:.2f} GiB "
        f"= {r['ratio']:.3f}x" for r in ranks) + f"  [{'ok' if row['within_bound'] else 'OVER'} <= {RATIO_BOUND}x]",
        flush=True)
    return row


def pack(folder: Path, tar_path: Path) -> float:
    from tests.checkpoint_writers import pack_nemo

    started = time.perf_counter()
    pack_nemo(folder, tar_path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="ranks (one process each)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary checkpoints go")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="parameter dtypes to load into (float32: the service on CPU; bfloat16: as on GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint_load.json")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if set(dtypes) - {"float32", "bfloat16"}:
        parser.error("--dtypes: float32 and/or bfloat16")

    import warnings

    warnings.filterwarnings("ignore")
    from sharding.checkpoints.cli import convert, inspect_checkpoint

    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "shape": {**SHAPE, "padded_vocab_size": VOCAB}, "tp": args.tp, "pp": 1,
        "checkpoint_dtype": "bfloat16", "saved_tp_chunking": 8, "ratio_bound": RATIO_BOUND,
        "accounting": "ratio = (peak RSS after load - RSS after imports and process-group init, before the "
                      "model is built) / bytes of the rank's parameters; fresh process per rank; the "
                      "checkpoint's pages are evicted from the page cache before each format",
        "formats": [],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ckpt-bench-") as tmp:
        tmp = Path(tmp)
        zarr_dir = tmp / "zarr"
        started = time.perf_counter()
        gen = generate_zarr_checkpoint(zarr_dir)
        results["generate_s"] = round(time.perf_counter() - started, 1)
        inspected = inspect_checkpoint(zarr_dir, tp=args.tp, pp=1, dtype="float32")
        results["parameters"] = {**inspected["parameters"], **gen}
        results["predicted_bytes_per_rank"] = inspected["per_rank"]["max_bytes_per_rank"]
        print(f"generated {inspected['parameters']['stored'] / 1e9:.3f}B parameters "
              f"({inspected['parameters']['loaded'] / 1e9:.3f}B loaded) in {results['generate_s']} s", flush=True)

        if "zarr" in formats:
            results["formats"] += [run_format("zarr", zarr_dir, args.tp, d) for d in dtypes]
        if "zarr-tar" in formats:
            tar = tmp / "zarr.nemo"
            results["pack_zarr_s"] = round(pack(zarr_dir, tar), 1)
            results["formats"] += [run_format("zarr-tar", tar, args.tp, d) for d in dtypes]
            tar.unlink()
        if {"torch_dist", "torch_dist-tar"} & set(formats):
            td_dir = tmp / "torch_dist"
            summary = convert(zarr_dir, td_dir, quiet=True)
            results["convert_s"] = summary["seconds"]
            shutil.rmtree(zarr_dir)
            if "torch_dist" in formats:
                results["formats"] += [run_format("torch_dist", td_dir, args.tp, d) for d in dtypes]
            if "torch_dist-tar" in formats:
                tar = tmp / "torch_dist.nemo"
                pack(td_dir, tar)
                shutil.rmtree(td_dir)
                results["formats"] += [run_format("torch_dist-tar", tar, args.tp, d) for d in dtypes]

    checksums = {(row["parameter_dtype"], tuple(r["checksum"] for r in row["ranks"])) for row in results["formats"]}
    results["same_parameters_in_every_format"] = len(checksums) == len({row["parameter_dtype"] for row in results["formats"]})
    results["all_within_bound"] = all(row["within_bound"] for row in results["formats"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"same parameters in every format: {results['same_parameters_in_every_format']}; "
          f"all within {RATIO_BOUND}x: {results['all_within_bound']}; wrote {args.out}")


if __name__ == "__main__":
    main()
