"""`python -m bench.gpu_check --dry-run`, as CI runs it: every phase passes on the CPU and the JSON holds every
key the GPU run writes (one key list, bench.gpu_check.RESULT_KEYS, for both). No Ray cluster is used."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_check
from configs.service import ParallelConfig

REPO = Path(__file__).resolve().parents[2]
DRY_RUN_LIMIT_S = sum(gpu_check.PHASE_TIMEOUT_S["dry-run"].values()) + 60


def test_dry_run_writes_every_key_of_the_gpu_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=DRY_RUN_LIMIT_S)
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert proc.returncode == 0, (report["failures"], proc.stdout[-3000:])
    assert report["ok"] is True and report["failures"] == [] and report["mode"] == "dry-run"
    assert gpu_check.key_problems(report) == []
    phases = report["phases"]
    assert all(phases[p]["ok"] for p in gpu_check.PHASES)

    env_result = phases["environment"]["result"]
    assert env_result["ray_imported"] is False and env_result["missing_modules"] == {}
    assert report["torch_version"] == env_result["torch_version"]

    tests = phases["gpu_tests"]["result"]
    assert tests["failed"] == 0 and tests["errors"] == 0
    ran = {t["name"].split("::")[-1] for t in tests["tests"] if t["outcome"] == "passed"}
    assert {"test_local_forward_bf16_cuda[padded]", "test_zarr_to_cuda_bf16_equals_torch_dist",
            "test_hf_seqcls_matches_transformers[llama-seqcls]",
            "test_hf_seqcls_matches_transformers[nemotron-seqcls]"} <= ran

    bench = phases["benchmark"]["result"]
    forest = "batch_layout" in ParallelConfig.model_fields  # this tree's engine has the forest layout
    assert env_result["forest_available"] is forest
    if forest:
        assert "test_local_forward_bf16_cuda[forest]" in ran
    measured = {name for name, s in bench["systems"].items() if "skipped" not in s}
    assert measured == set(gpu_check.SYSTEMS) - (set() if forest else {"engine_forest"})
    for name in measured:
        system = bench["systems"][name]
        assert system["rewards_finite"] is True and system["tok_s"] > 0 and len(system["pass_s"]) == 3
        assert bench["real_tokens"] == sum(bench["lengths"])
        if name != "engine_forest":  # the forest computes a prefix shared by sequences once
            assert system["computed_tokens"] >= bench["real_tokens"]
        assert math.isclose(system["mfu"], system["tflops"] / bench["matmul_tflops"], rel_tol=0.01)
        assert report[f"{name}_mfu"] == system["mfu"]
    assert set(bench["warm_up_s"]) == {"padded", "forest"}  # timed per layout (CUDA only: null here)
    assert all(v is None for v in bench["warm_up_s"].values())
    if forest:
        assert 0 <= bench["flex_vs_dense_max_abs_diff"] <= 1e-5  # float32 on CPU
    assert bench["sequence_parallel"].startswith("not run: one GPU is TP1")
    assert "sharding.cost_model.stage_cost" in bench["flop_formula"]
    for layout in ("padded", "forest"):
        key = f"engine_{layout}_over_transformers_sorted"
        expected = (round(bench["systems"][f"engine_{layout}"]["tok_s"]
                          / bench["systems"]["transformers_sorted"]["tok_s"], 4)
                    if f"engine_{layout}" in measured else None)
        assert report[key] == bench[key] == expected
