"""The repository's layout rules: folders say what is inside them, no two modules share a name, the jobs
client needs neither Serve nor FastAPI, docs name only files that exist, and the project cites nothing
outside itself."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("deployments", "sharding", "jobs", "bench")
SHARED_NAMES = {"__init__", "__main__"}


def _project_files(*suffixes: str) -> list[Path]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    paths = {REPO / line for line in (tracked + untracked).splitlines() if line}
    return sorted(p for p in paths if p.suffix in suffixes and p.is_file())


def test_no_two_modules_share_a_stem():
    by_stem: dict[str, list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.stem not in SHARED_NAMES:
                by_stem[path.stem].append(str(path.relative_to(REPO)))
    assert {stem: paths for stem, paths in by_stem.items() if len(paths) > 1} == {}


def test_jobs_client_loads_neither_serve_nor_fastapi():
    code = ("import sys, jobs.client, jobs.annotate, jobs.evaluate, jobs.score, jobs.rows, jobs.tables\n"
            "print(sorted(m for m in ('ray.serve', 'fastapi', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_project_cites_nothing_outside_itself():
    pattern = re.compile(r"REFERENCE\.md|\.\./shared")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _project_files(".py", ".md", ".yaml", ".sh", ".toml")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) and path.name != "test_layout.py"
    ]
    assert offenders == []


def test_architecture_page_names_only_files_that_exist():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([A-Za-z0-9_./-]+\.(?:py|yaml|sh|md|txt|json))`", text))
    assert len(named) >= 15, "the page should walk through the files"
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert missing == []
