"""bench.gpu_check's parent side without torch: the one key list, phase isolation, the shell scripts' syntax.
The whole dry run is tests/integration/test_gpu_check.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]


def complete_report() -> dict:
    system = {k: 1.0 for k in gpu_check.SYSTEM_KEYS}
    results = {phase: {k: None for k in keys} for phase, keys in gpu_check.RESULT_KEYS.items()}
    results["benchmark"]["systems"] = {name: dict(system) for name in gpu_check.SYSTEMS}
    phases = {p: {**{k: None for k in gpu_check.PHASE_KEYS}, "ok": True, "result": results[p]}
              for p in gpu_check.PHASES}
    return {**{k: None for k in gpu_check.TOP_KEYS}, "phases": phases}


def test_complete_report_has_no_key_problems():
    assert gpu_check.key_problems(complete_report()) == []


def test_key_problems_name_missing_and_extra_keys():
    report = complete_report()
    del report["engine_forest_over_transformers_sorted"]
    del report["phases"]["environment"]["result"]["gpu_name"]
    report["phases"]["gpu_tests"]["result"]["surprise"] = 1
    del report["phases"]["benchmark"]["result"]["systems"]["transformers_sorted"]["mfu"]
    assert gpu_check.key_problems(report) == [
        "engine_forest_over_transformers_sorted", "environment.result.gpu_name", "gpu_tests.result.+surprise",
        "benchmark.systems.transformers_sorted.mfu"]


def test_a_skipped_system_needs_only_its_reason():
    report = complete_report()
    report["phases"]["benchmark"]["result"]["systems"]["engine_forest"] = {"skipped": "not in this tree"}
    assert gpu_check.key_problems(report) == []
    report["phases"]["benchmark"]["result"]["systems"]["engine_forest"] = {"skipped": None}
    assert "benchmark.systems.engine_forest.tok_s" in gpu_check.key_problems(report)


def test_a_failed_phase_is_reported_once_not_per_key():
    report = complete_report()
    report["phases"]["benchmark"].update(ok=False, result=None)
    assert gpu_check.key_problems(report, failed_phases_too=False) == []
    assert "benchmark.result.systems" in gpu_check.key_problems(report)
    head = gpu_check.headline(report["phases"])
    assert head["engine_padded_mfu"] is None and head["engine_forest_over_transformers_sorted"] is None


def test_a_phase_past_its_time_limit_is_killed_and_reported(tmp_path):
    meta = gpu_check.run_phase("environment", True, tmp_path / "environment.json", timeout_s=0.5)
    assert meta["ok"] is False and meta["result"] is None
    assert meta["error"] == "time limit: killed after 0.5 s"
    assert set(meta) == set(gpu_check.PHASE_KEYS)


@pytest.mark.parametrize("script", ["scripts/gpu_check.sh", "scripts/gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_gpu_check_sh_refuses_a_folder_without_wheels(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert f"no wheels in '{tmp_path}'" in proc.stderr


def test_parent_imports_neither_torch_nor_ray():
    code = "import sys, bench.gpu_check; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
