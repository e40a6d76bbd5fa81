"""Inspect a checkpoint, or convert its zarr weights to torch_dist.

    python -m sharding.checkpoints inspect PATH [--tp 8 --pp 2] [--dtype bfloat16] [--disk-mb-per-s 1000] [--json]
    python -m sharding.checkpoints convert PATH OUT [--drop-output-layer]

PATH is an extracted `.nemo` directory, a packed `.nemo`, or a bare `model_weights/` folder.

`inspect` prints the format (backend, key prefix, packed or not), every stored tensor with its shape,
dtype and chunk shape, the parameter count (stored, and what the reward model loads: everything but the
LM output layer), and the parameter memory of every rank at TP x PP: decoder layers split evenly over
the stages, embedding on the first stage, final layernorm and reward head (float32) on the last,
column-/row-parallel weights and the embedding divided by TP, layernorms whole on every TP rank. With
one pipeline stage per node (the service's STRICT_SPREAD placement), it also prints the checkpoint bytes
each node reads (its TP ranks' slices together) and, with `--disk-mb-per-s`, how long that read takes at
that disk throughput (1 MB = 10^6 bytes; page cache and parallel reads ignored).

`convert` writes OUT as an extracted `.nemo` directory (config and tokenizer copied, weights as torch_dist)
or, for a bare weights folder, as a torch_dist weights folder. It streams one chunk at a time and keeps
the chunk layout (a TP 8 save stays 8 pieces per tensor), so a rank later reads only its pieces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from sharding.checkpoints.files import CheckpointFiles, open_files
from sharding.checkpoints.nemo import (
    CONFIG_FILE,
    METADATA_FILE,
    CheckpointFormatError,
    NemoCheckpoint,
    read_weights_format,
)

# How a TP save splits each tensor (axis of the per-layer tensor; None = whole on every TP rank). Keys are
# Transformer-Engine names without the prefix.
TP_SPLIT_AXIS: dict[str, int | None] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.layers.self_attention.linear_qkv.weight": 0,
    "decoder.layers.self_attention.linear_qkv.bias": 0,
    "decoder.layers.self_attention.linear_proj.weight": 1,
    "decoder.layers.self_attention.linear_proj.bias": None,
    "decoder.layers.mlp.linear_fc1.weight": 0,
    "decoder.layers.mlp.linear_fc1.bias": 0,
    "decoder.layers.mlp.linear_fc2.weight": 1,
    "decoder.layers.mlp.linear_fc2.bias": None,
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": None,
    "decoder.layers.self_attention.linear_qkv.layer_norm_bias": None,
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": None,
    "decoder.layers.mlp.linear_fc1.layer_norm_bias": None,
    "decoder.final_layernorm.weight": None,
    "decoder.final_layernorm.bias": None,
    "rm_head.weight": 1,
    "rm_head.bias": None,
}
NOT_LOADED = {"output_layer.weight": "LM output layer: a reward model never reads it"}
FIRST_STAGE = ("embedding.",)
LAST_STAGE = ("decoder.final_layernorm.", "rm_head.")
FLOAT32_KEYS = ("rm_head.",)  # the reward head is built in float32 whatever the serving dtype
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}
GIB = 1024**3


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _locate(path: Path) -> tuple[NemoCheckpoint | None, CheckpointFiles]:
    """(the NeMo checkpoint or None for a bare weights folder, the weights' files)."""
    files = open_files(path)
    if files.is_file(CONFIG_FILE):
        checkpoint = NemoCheckpoint.open(path)
        return checkpoint, checkpoint.weights_files
    if files.is_file(METADATA_FILE):
        return None, files
    raise CheckpointFormatError(f"{path}: neither a .nemo checkpoint ({CONFIG_FILE}) nor a weights folder ({METADATA_FILE})")


def inspect_checkpoint(path: str | Path, tp: int = 1, pp: int = 1, dtype: str = "bfloat16",
                       disk_mb_per_s: float | None = None) -> dict:
    """Everything `inspect` prints, as a dict (JSON-ready)."""
    from sharding.checkpoints.dist_readers import tensor_infos

    path = Path(path).expanduser().resolve()
    checkpoint, files = _locate(path)
    fmt = read_weights_format(files)
    infos = tensor_infos(files, fmt)
    prefix = fmt.key_prefix
    extra_state = sorted(n for n in files.listdir() if n.endswith("._extra_state") and files.is_dir(n))
    result: dict = {
        "path": str(path),
        "packed": files.packed,
        "weights": str(files.location),
        "backend": fmt.backend,
        "backend_version": fmt.version,
        "key_prefix": prefix,
        "tensors": [],
        "ignored": {name: "Transformer-Engine extra state (not needed for a forward)" for name in extra_state},
    }
    if checkpoint is not None:
        arch = checkpoint.arch
        result["model"] = {
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
            "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.num_query_groups,
            "head_dim": arch.head_dim, "padded_vocab_size": arch.padded_vocab_size,
            "num_attributes": arch.num_attributes, "rm_head_bias": arch.rm_head_bias,
            "normalization": arch.normalization, "activation": arch.activation,
            "tokenizer": str(checkpoint.raw_config["tokenizer"]["model"]),
        }
    stored = loaded = stored_bytes = 0
    num_layers = None
    for key, info in sorted(infos.items()):
        name = key[len(prefix):] if key.startswith(prefix) else key
        skip = NOT_LOADED.get(name)
        result["tensors"].append({"key": key, "shape": list(info.shape), "dtype": info.dtype,
                                  "chunks": [list(c) for c in info.chunks], "loaded": skip is None,
                                  **({"note": skip} if skip else {})})
        stored += info.numel
        stored_bytes += info.nbytes
        if skip is None:
            loaded += info.numel
        if name.startswith("decoder.layers."):
            num_layers = info.shape[0]
    result["parameters"] = {"stored": stored, "stored_bytes": stored_bytes, "loaded": loaded}
    result["per_rank"] = per_rank_memory(infos, prefix, tp, pp, dtype, num_layers)
    result["per_node"] = per_node_load(result["per_rank"], disk_mb_per_s)
    return result


def per_node_load(per_rank: dict, disk_mb_per_s: float | None) -> list[dict]:
    """One node per pipeline stage: the checkpoint bytes its TP ranks read, and the read time at the given
    disk throughput (MB = 10^6 bytes) when one is given."""
    nodes = []
    for stage in per_rank["stages"]:
        read = stage["checkpoint_bytes_read_per_rank"] * stage["ranks"]
        node = {"node": stage["stage"], "stage": stage["stage"], "checkpoint_bytes_read": read}
        if disk_mb_per_s is not None:
            node["disk_mb_per_s"] = disk_mb_per_s
            node["load_s"] = read / (disk_mb_per_s * 1e6)
        nodes.append(node)
    return nodes


def per_rank_memory(infos: dict, prefix: str, tp: int, pp: int, dtype: str, num_layers: int | None) -> dict:
    """Parameter bytes of each pipeline stage's ranks (every TP rank of a stage holds the same amount)."""
    problems = []
    if num_layers is not None and num_layers % pp:
        problems.append(f"num_layers {num_layers} is not divisible by PP {pp}")
    stages = []
    layers_per_stage = (num_layers or 0) // pp if num_layers and not num_layers % pp else None
    unknown = []
    for stage in range(pp):
        params = bytes_ = read_bytes = 0
        holds = []
        for key, info in infos.items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            if name in NOT_LOADED:
                continue
            if name.startswith("decoder.layers."):
                if layers_per_stage is None:
                    continue
                numel = info.numel // info.shape[0] * layers_per_stage
            elif name.startswith(FIRST_STAGE):
                if stage != 0:
                    continue
                numel = info.numel
            elif name.startswith(LAST_STAGE):
                if stage != pp - 1:
                    continue
                numel = info.numel
            else:
                if stage == 0:
                    unknown.append(key)
                numel = info.numel  # unknown: assume every stage holds it whole (an upper bound)
            axis = TP_SPLIT_AXIS.get(name)
            if axis is not None:
                full_axis = axis + (1 if name.startswith("decoder.layers.") else 0)
                if info.shape[full_axis] % tp:
                    problems.append(f"{key}: axis {full_axis} ({info.shape[full_axis]}) is not divisible by TP {tp}")
                numel = -(-numel // tp)
            size = 4 if name.startswith(FLOAT32_KEYS) else DTYPE_BYTES[dtype]
            params += numel
            bytes_ += numel * size
            read_bytes += numel * DTYPE_BYTES.get(info.dtype, 4)
            holds.append(name)
        what = []
        if layers_per_stage is not None:
            what.append(f"layers {stage * layers_per_stage}-{(stage + 1) * layers_per_stage - 1}")
        what += [n.split(".")[0] if not n.startswith("decoder.final") else "final_layernorm"
                 for n in sorted({h for h in holds if not h.startswith("decoder.layers.")})]
        stages.append({"stage": stage, "ranks": tp, "holds": sorted(set(what), key=what.index),
                       "parameters_per_rank": params, "bytes_per_rank": bytes_, "checkpoint_bytes_read_per_rank": read_bytes})
    return {"tp": tp, "pp": pp, "dtype": dtype, "stages": stages, "problems": problems,
            "unknown_keys_assumed_replicated": sorted(set(unknown)),
            "max_bytes_per_rank": max(s["bytes_per_rank"] for s in stages)}


def format_inspection(r: dict) -> str:
    lines = [f"checkpoint  {r['path']}  ({'packed .nemo' if r['packed'] else 'directory'})",
             f"weights     {r['weights']}  backend {r['backend']} v{r['backend_version']}, "
             f"key prefix {r['key_prefix']!r}" if r["key_prefix"] else
             f"weights     {r['weights']}  backend {r['backend']} v{r['backend_version']}, no key prefix"]
    if "model" in r:
        m = r["model"]
        lines.append(f"model       {m['num_layers']} layers, hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, "
                     f"{m['num_attention_heads']} heads / {m['num_query_groups']} query groups (head dim {m['head_dim']}), "
                     f"vocab {m['padded_vocab_size']}, {m['normalization']}, {m['activation']}, "
                     f"{m['num_attributes']} attributes, rm_head bias {'yes' if m['rm_head_bias'] else 'no'}")
        lines.append(f"tokenizer   {m['tokenizer']}")
    width = max((len(t["key"]) for t in r["tensors"]), default=10)
    lines.append(f"tensors     {len(r['tensors'])}")
    for t in r["tensors"]:
        chunks = " | ".join("x".join(map(str, c)) for c in t["chunks"])
        shape = "x".join(map(str, t["shape"])) or "scalar"
        note = f"  (not loaded: {t['note']})" if not t["loaded"] else ""
        lines.append(f"  {t['key']:<{width}}  {shape:>18}  {t['dtype']:<8}  chunks {chunks}{note}")
    for name, why in r["ignored"].items():
        lines.append(f"  {name:<{width}}  (ignored: {why})")
    p = r["parameters"]
    lines.append(f"parameters  stored {p['stored']:,} ({human_bytes(p['stored_bytes'])} as stored); "
                 f"the reward model loads {p['loaded']:,}")
    pr = r["per_rank"]
    lines.append(f"per rank    TP {pr['tp']} x PP {pr['pp']}, {pr['dtype']} parameters (rm_head float32):")
    for s in pr["stages"]:
        lines.append(f"  stage {s['stage']} ({', '.join(s['holds'])}): {s['parameters_per_rank']:,} parameters, "
                     f"{human_bytes(s['bytes_per_rank'])} per rank x {s['ranks']} ranks "
                     f"(reads {human_bytes(s['checkpoint_bytes_read_per_rank'])} of the checkpoint)")
    lines.append(f"  largest rank: {human_bytes(pr['max_bytes_per_rank'])} of parameters (activations and "
                 "framework memory come on top)")
    for node in r.get("per_node", []):
        line = (f"node {node['node']} (stage {node['stage']}): reads {human_bytes(node['checkpoint_bytes_read'])} "
                f"({node['checkpoint_bytes_read'] / 1e9:.1f} GB) of the checkpoint")
        if "load_s" in node:
            line += f"; at {node['disk_mb_per_s']:g} MB/s that takes ~{node['load_s'] / 60:.1f} min"
        lines.append(line)
    for problem in pr["problems"]:
        lines.append(f"  cannot split: {problem}")
    if pr["unknown_keys_assumed_replicated"]:
        lines.append(f"  unknown keys counted whole on every rank: {', '.join(pr['unknown_keys_assumed_replicated'])}")
    return "\n".join(lines)


def convert(path: str | Path, out: str | Path, *, drop_output_layer: bool = False, quiet: bool = False) -> dict:
    """zarr -> torch_dist. For a .nemo checkpoint, OUT is an extracted .nemo directory."""
    from sharding.checkpoints.convert import convert_zarr_to_torch_dist

    path, out = Path(path).expanduser().resolve(), Path(out).expanduser().resolve()
    checkpoint, weights = _locate(path)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    started = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int, key: str) -> None:
        now = time.monotonic()
        if not quiet and (now - last[0] > 5 or done == total):
            last[0] = now
            print(f"  {done}/{total} chunks ({key})", file=sys.stderr, flush=True)

    if checkpoint is None:
        summary = convert_zarr_to_torch_dist(weights, out, drop_output_layer=drop_output_layer, progress=progress)
    else:
        out.mkdir(parents=True, exist_ok=True)
        weights_name = checkpoint.weights_dir_name
        for name in checkpoint.files.listdir():
            if name == weights_name:
                continue
            _copy_tree(checkpoint.files, name, out / name)
        summary = convert_zarr_to_torch_dist(weights, out / weights_name, drop_output_layer=drop_output_layer,
                                             progress=progress)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["out"] = str(out)
    return summary


def _copy_tree(files: CheckpointFiles, rel: str, dest: Path) -> None:
    if files.is_dir(rel):
        dest.mkdir(parents=True, exist_ok=True)
        for name in files.listdir(rel):
            _copy_tree(files, f"{rel}/{name}", dest / name)
        return
    with files.open(rel) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="format, tensors, parameter count, memory per rank")
    ins.add_argument("path", type=Path)
    ins.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the per-rank memory")
    ins.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for the per-rank memory")
    ins.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="serving dtype of the parameters (the reward head is float32 regardless)")
    ins.add_argument("--disk-mb-per-s", type=float, default=None,
                     help="disk read throughput of a node in MB/s (10^6 bytes), for the estimated load time")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    conv = sub.add_parser("convert", help="zarr -> torch_dist")
    conv.add_argument("path", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--drop-output-layer", action="store_true",
                      help="leave out the LM output layer (a reward model never reads it)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core: "Transformer Engine ... not installed"
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.command == "inspect":
            if args.tp < 1 or args.pp < 1:
                parser.error("--tp and --pp must be >= 1")
            if args.disk_mb_per_s is not None and args.disk_mb_per_s <= 0:
                parser.error("--disk-mb-per-s must be > 0")
            result = inspect_checkpoint(args.path, args.tp, args.pp, args.dtype, args.disk_mb_per_s)
            print(json.dumps(result, indent=2) if args.json else format_inspection(result))
        else:
            summary = convert(args.path, args.out, drop_output_layer=args.drop_output_layer)
            print(json.dumps(summary, indent=2))
    except (CheckpointFormatError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
