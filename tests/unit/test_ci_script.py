"""`.ci/run` runs `scripts/test.sh`; the pytest command it ends in prints the 15 slowest tests and passes the
caller's arguments on. Run for real, in a copy of the scripts whose setup step and `.venv` python are
stand-ins that record what they were given."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ci_run_passes_durations_and_the_callers_arguments_to_pytest(tmp_path):
    for script in (".ci/run", "scripts/test.sh"):
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / script, tmp_path / script)
    (tmp_path / "scripts/setup.sh").write_text("echo setup ran\n")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\necho "python $*"\n')
    python.chmod(0o755)

    ci = subprocess.run(["bash", str(tmp_path / ".ci/run")], capture_output=True, text=True, check=True)
    assert ci.stdout.splitlines() == ["setup ran", "python -m pytest tests -q --durations=15"]

    direct = subprocess.run(["bash", str(tmp_path / "scripts/test.sh"), "-k", "score and not gpu", "-x"],
                            capture_output=True, text=True, check=True)
    assert direct.stdout.splitlines()[-1] == "python -m pytest tests -q --durations=15 -k score and not gpu -x"
