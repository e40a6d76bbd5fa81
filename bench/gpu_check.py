"""The GPU path proven by one command: environment, the GPU test tier, and the engine beside transformers.

    python -m bench.gpu_check                     # one CUDA GPU: bf16, NCCL -> $OUT/gpu_check.json (or bench/results/)
    python -m bench.gpu_check --dry-run           # the same phases on CPU, float32, tiny shapes (< 2 min)
    scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]      # on a bare GPU machine: installs the wheels, then the above

Each phase runs in its own child process (`python -m bench.gpu_check --phase NAME`) under its own time
limit, and writes its own result file; the parent merges them into one JSON, so a phase that fails or
times out still leaves the others' results. Phases:

  environment  GPU name, torch / CUDA / megatron-core / transformers versions; imports the modules the
               other phases use and checks that none of them imports Ray (the GPU machine has none).
  gpu_tests    `pytest tests/gpu` (bf16 CUDA forward vs the float32 CPU forward of the demo checkpoint at
               every batch layout; zarr vs torch_dist on CUDA; HF Llama / Nemotron parity with
               transformers in bf16); with --dry-run `--tier-device cpu`. Counts and per-test outcomes.
  benchmark    `bench.gpu_speed`: the engine (padded and forest layouts) beside transformers (arrival order
               and length-sorted) on the Nemotron-15B-like shape, same sequences, same process; MFU from
               `sharding.cost_model.stage_cost` (the simulated accelerator's accounting); the setup warm-up's
               time per layout; flex attention against dense masked SDPA on the forest rows; sequence
               parallelism recorded as not run (one GPU is TP1; it is checked at TP2 on CPU).

The parent exits 1 if any phase fails (non-zero exit, time limit, a failed test, missing keys), else 0.
The keys of every phase's result are listed once below (`RESULT_KEYS`); the GPU run and the dry run write
them through the same code, and tests/integration/test_gpu_check.py checks the dry run's JSON against them.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = ("environment", "gpu_tests", "benchmark")
# Seconds per phase. GPU: 45 + 155 + 260 = 460 s, inside the 8-minute budget with the wheel install.
PHASE_TIMEOUT_S = {
    "gpu": {"environment": 45, "gpu_tests": 155, "benchmark": 260},
    # A dry run took 93 s on a shared 2-core machine at load average 10-25, and its tests phase alone 290 s
    # at load 40-90: these limits only catch hangs.
    "dry-run": {"environment": 120, "gpu_tests": 480, "benchmark": 240},
}
SYSTEMS = ("engine_padded", "engine_forest", "transformers_arrival", "transformers_sorted")
SYSTEM_KEYS = ("tok_s", "tflops", "mfu", "s", "pass_s", "computed_tokens", "peak_memory_gib", "rewards_finite",
               "build_s")
RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "environment": ("device", "gpu_name", "cuda_version", "torch_version", "megatron_core_version",
                    "transformers_version", "python_version", "platform", "modules_imported", "missing_modules",
                    "ray_imported", "forest_available"),
    "gpu_tests": ("command", "passed", "failed", "errors", "skipped", "tests"),
    "benchmark": ("device", "dtype", "shape", "nseq", "length_range", "lengths", "real_tokens", "micro_batching",
                  "matmul_n", "matmul_tflops", "flop_formula", "systems", "forest_vs_padded_max_abs_diff",
                  "engine_padded_over_transformers_sorted", "engine_forest_over_transformers_sorted", "warm_up_s",
                  "flex_vs_dense_max_abs_diff", "sequence_parallel"),
}
PHASE_KEYS = ("ok", "rc", "wall_s", "timeout_s", "error", "output_tail", "result")
HEADLINE_KEYS = ("gpu_name", "torch_version", "cuda_version", "matmul_tflops", "engine_padded_mfu",
                 "engine_forest_mfu", "transformers_arrival_mfu", "transformers_sorted_mfu",
                 "engine_padded_over_transformers_sorted", "engine_forest_over_transformers_sorted")
TOP_KEYS = ("mode", "ok", "failures", "timestamp", "command", "wall_s", *HEADLINE_KEYS, "phases")
# Modules the phases import; none may pull in Ray.
PROJECT_MODULES = ("configs.service", "sharding.local", "sharding.model", "sharding.micro_batches",
                   "demo", "sharding.checkpoints.formats", "sharding.checkpoints.nemo_weights", "tests.gpu.cpu_side",
                   "tests.checkpoint_writers", "bench.gpu_speed")
THIRD_PARTY_MODULES = ("torch", "megatron.core", "numpy", "sentencepiece", "yaml", "safetensors", "pydantic",
                       "psutil", "pytest")


def missing_keys(value: Any, keys: tuple[str, ...]) -> list[str]:
    """Keys of `keys` not in `value`, plus keys in `value` not in `keys` (prefixed '+')."""
    if not isinstance(value, dict):
        return list(keys)
    return [k for k in keys if k not in value] + [f"+{k}" for k in value if k not in keys]


def check_system(name: str, entry: Any) -> list[str]:
    """A benchmark system is either measured (every SYSTEM_KEYS key) or skipped with a reason."""
    if isinstance(entry, dict) and set(entry) == {"skipped"} and isinstance(entry["skipped"], str):
        return []
    return [f"{name}.{k}" for k in missing_keys(entry, SYSTEM_KEYS)]


def key_problems(report: dict, failed_phases_too: bool = True) -> list[str]:
    """Every place where `report` (the merged JSON) departs from the key lists above; a failed phase's
    result is left out unless `failed_phases_too` (its failure is already reported)."""
    problems = missing_keys(report, TOP_KEYS)
    for phase in PHASES:
        meta = report.get("phases", {}).get(phase)
        problems += [f"{phase}.{k}" for k in missing_keys(meta, PHASE_KEYS)]
        if not failed_phases_too and isinstance(meta, dict) and not meta.get("ok"):
            continue
        result = (meta or {}).get("result")
        problems += [f"{phase}.result.{k}" for k in missing_keys(result, RESULT_KEYS[phase])]
        if phase == "benchmark" and isinstance(result, dict):
            systems = result.get("systems", {})
            problems += [f"benchmark.systems.{k}" for k in missing_keys(systems, SYSTEMS)]
            for name in SYSTEMS:
                problems += check_system(f"benchmark.systems.{name}", systems.get(name))
    return problems


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ phases


def phase_environment(dry_run: bool, result_path: Path) -> bool:
    import importlib
    import importlib.metadata
    import importlib.util

    imported, missing = [], {}
    for name in THIRD_PARTY_MODULES + PROJECT_MODULES:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as exc:  # noqa: BLE001 - recorded, and fails the phase
            missing[name] = f"{type(exc).__name__}: {exc}"
    torch = sys.modules.get("torch")  # None when it could not be imported (listed in missing_modules)
    cuda = bool(torch and torch.cuda.is_available())
    transformers_version = megatron_version = None
    if importlib.util.find_spec("transformers") is not None:
        transformers_version = importlib.metadata.version("transformers")
    if "megatron.core" in imported:
        megatron_version = importlib.metadata.version("megatron-core")
    result = {
        "device": "cpu" if dry_run else "cuda",
        "gpu_name": torch.cuda.get_device_name() if cuda else None,
        "cuda_version": torch.version.cuda if torch else None,
        "torch_version": torch.__version__ if torch else None,
        "megatron_core_version": megatron_version,
        "transformers_version": transformers_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "modules_imported": imported,
        "missing_modules": missing,
        "ray_imported": "ray" in sys.modules,
        "forest_available": bool(sys.modules.get("bench.gpu_speed")
                                 and sys.modules["bench.gpu_speed"].forest_layout_available()),
    }
    write_json(result_path, result)
    for name, why in missing.items():
        print(f"environment: cannot import {name}: {why}", flush=True)
    if result["ray_imported"]:
        print("environment: importing the project's modules imported ray", flush=True)
    if not dry_run and not cuda:
        print(f"environment: CUDA is not available to torch {result['torch_version']}", flush=True)
    return not missing and not result["ray_imported"] and (dry_run or cuda)


def _junit_tests(xml_path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:500]
                break
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": round(float(case.get("time") or 0), 2), "message": message})
    return tests


def phase_gpu_tests(dry_run: bool, result_path: Path) -> bool:
    import pytest

    xml_path = result_path.with_suffix(".junit.xml")
    # Own --basetemp: pytest's default folder is shared by every pytest run of the user, whose clean-up can
    # remove a concurrent run's files.
    args = ["tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
            f"--basetemp={result_path.parent / 'pytest'}", "--tier-device", "cpu" if dry_run else "cuda"]
    rc = int(pytest.main(args))
    tests = _junit_tests(xml_path) if xml_path.is_file() else []
    counts = collections.Counter(t["outcome"] for t in tests)
    command = "pytest " + " ".join(a for a in args if not a.startswith(("--junitxml", "--basetemp")))
    write_json(result_path, {"command": command,
                             "passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
                             "skipped": counts["skipped"], "tests": tests})
    return rc == 0 and counts["passed"] > 0


def phase_benchmark(dry_run: bool, result_path: Path) -> bool:
    from bench.gpu_speed import run_benchmark

    return run_benchmark(dry_run, lambda result: write_json(result_path, result))


PHASE_FUNCTIONS = {"environment": phase_environment, "gpu_tests": phase_gpu_tests, "benchmark": phase_benchmark}


# ------------------------------------------------------------------------------------------------ parent


def run_phase(phase: str, dry_run: bool, result_path: Path, timeout_s: float) -> dict:
    """Runs one phase in a child process (own process group, killed whole at the time limit)."""
    cmd = [sys.executable, "-W", "ignore", "-m", "bench.gpu_check", "--phase", phase, "--result", str(result_path)]
    if dry_run:
        cmd.append("--dry-run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    tail: collections.deque[str] = collections.deque(maxlen=60)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"[{phase}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    error = None
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        error = f"time limit: killed after {timeout_s} s"
    reader.join(timeout=5)
    result = None
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    elif error is None:
        error = f"exited {rc} without writing its result"
    if error is None and rc != 0:
        error = f"exited {rc}"
    return {"ok": error is None, "rc": rc, "wall_s": round(time.monotonic() - start, 1), "timeout_s": timeout_s,
            "error": error, "output_tail": "\n".join(tail), "result": result}


def headline(phases: dict) -> dict:
    env = phases["environment"]["result"] or {}
    bench = phases["benchmark"]["result"] or {}
    systems = bench.get("systems", {})
    out = {"gpu_name": env.get("gpu_name"), "torch_version": env.get("torch_version"),
           "cuda_version": env.get("cuda_version"), "matmul_tflops": bench.get("matmul_tflops")}
    for name in ("engine_padded", "engine_forest", "transformers_arrival", "transformers_sorted"):
        out[f"{name}_mfu"] = systems.get(name, {}).get("mfu")
    for key in ("engine_padded_over_transformers_sorted", "engine_forest_over_transformers_sorted"):
        out[key] = bench.get(key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, tiny shapes: checks the code path.")
    parser.add_argument("--out", type=Path, help="Output folder (default: $OUT if set, else bench/results).")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # child process
        sys.exit(0 if PHASE_FUNCTIONS[args.phase](args.dry_run, args.result) else 1)

    mode = "dry-run" if args.dry_run else "gpu"
    out_dir = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # phases' result files and pytest's tmp_path
    start = time.monotonic()
    report: dict[str, Any] = {"mode": mode, "ok": False, "failures": [],
                              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "command": "python -m bench.gpu_check" + (" --dry-run" if args.dry_run else ""),
                              "wall_s": None, **{k: None for k in HEADLINE_KEYS}, "phases": {}}
    try:
        for phase in PHASES:
            timeout_s = PHASE_TIMEOUT_S[mode][phase]
            print(f"== {phase} (time limit {timeout_s} s)", flush=True)
            report["phases"][phase] = run_phase(phase, args.dry_run, work / f"{phase}.json", timeout_s)
            meta = report["phases"][phase]
            print(f"== {phase}: {'ok' if meta['ok'] else 'FAILED: ' + meta['error']} in {meta['wall_s']} s",
                  flush=True)
            report.update(headline({p: report["phases"].get(p, {"result": None}) for p in PHASES}))
            report["wall_s"] = round(time.monotonic() - start, 1)
            write_json(out_path, report)  # after every phase: what finished is kept
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = [f"{p}: {m['error']}" for p, m in report["phases"].items() if not m["ok"]]
    failures += [f"key: {k}" for k in key_problems(report, failed_phases_too=False)]
    report.update(ok=not failures, failures=failures, wall_s=round(time.monotonic() - start, 1))
    write_json(out_path, report)
    print(json.dumps({k: report[k] for k in TOP_KEYS if k != "phases"}, indent=1))
    print(f"wrote {out_path}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
