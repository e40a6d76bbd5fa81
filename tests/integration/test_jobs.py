"""The batch jobs against the TP1 app: `python -m jobs annotate` (HTTP and handles, raw and --round, killed
midway and resumed, Parquet shards in and out) and `python -m jobs evaluate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.service import ATTRIBUTE_NAMES
from deployments.schemas import attribute_string
from jobs.tables import ERRORS_FILE, read_output
from tests.integration.conftest import REPO
from tests.integration.test_service import LONG_TEXT, TOPICS

TOL = 1e-5
NUM_LINES = 200
MALFORMED = {17: "{not json", 101: json.dumps({"mask": "User"}),
             150: json.dumps({"conversations": [{"from": "User", "value": "hi", "label": "x"},
                                                {"from": "Assistant", "value": "yo", "label": None}], "mask": "User"})}
KILL_AFTER_LINES = 40


def steerlm_line(i: int) -> dict:
    turns = []
    for t in range(1 + i % 3):
        topic = TOPICS[(i + t) % len(TOPICS)]
        last = t == i % 3
        turns.append({"from": "User", "value": f"Question {i}.{t}: tell me about {topic}.", "label": None})
        turns.append({"from": "Assistant", "value": " ".join(f"{topic} note {k}." for k in range(2 + (i * 7 + t) % 13)),
                      "label": "" if last or i % 4 == 0 else None})
    return {"system": "", "conversations": turns, "mask": "User", "id": f"line-{i}", "split": "train"}


def run_job(*args: str, env: dict | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *args, "--no-progress"], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def steerlm_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("annotate") / "in.jsonl"
    lines = [MALFORMED.get(n) or json.dumps(steerlm_line(n)) for n in range(1, NUM_LINES + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def raw_run(demo_app, steerlm_file) -> tuple[Path, subprocess.CompletedProcess]:
    out = steerlm_file.with_name("raw.jsonl")
    done = run_job("annotate", "--input", str(steerlm_file), "--output", str(out), "--url", demo_app,
                   "--concurrency", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="module")
def rounded_run(demo_app, ray_cluster, steerlm_file) -> Path:
    out = steerlm_file.with_name("rounded.jsonl")
    done = run_job("annotate", "--input", str(steerlm_file), "--output", str(out), "--address", ray_cluster.address,
                   "--round", "--concurrency", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def without_labels(obj: dict) -> dict:
    return {**obj, "conversations": [{k: v for k, v in t.items() if k != "label"} for t in obj["conversations"]]}


def labels_of(obj: dict) -> list[dict[str, float] | None]:
    return [None if t["label"] is None else {k: float(v) for k, v in (p.split(":") for p in t["label"].split(","))}
            for t in obj["conversations"]]


def test_annotate_labels_every_labelled_turn(http, raw_run, steerlm_file):
    out, done = raw_run
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == NUM_LINES - len(MALFORMED)
    for n in MALFORMED:
        assert f"in.jsonl:{n}: malformed" in done.stderr
    assert f"{NUM_LINES} input lines: {NUM_LINES - len(MALFORMED)} written" in done.stderr
    assert f"{len(MALFORMED)} malformed" in done.stderr
    inputs = [json.loads(line) for n, line in enumerate(steerlm_file.read_text().splitlines(), 1) if n not in MALFORMED]
    for source, obj in zip(inputs, written):
        assert {k: v for k, v in obj.items() if k != "conversations"} == {k: v for k, v in source.items()
                                                                         if k != "conversations"}
        assert [(t["from"], t["value"]) for t in obj["conversations"]] == [(t["from"], t["value"])
                                                                           for t in source["conversations"]]
        for turn, label in zip(source["conversations"], labels_of(obj)):
            assert (label is None) == (turn["label"] is None)
            assert label is None or list(label) == list(ATTRIBUTE_NAMES)
    # The labels are /v1/score's numbers for each labelled turn's prefix.
    sample = written[:12]
    prefixes, labels = [], []
    for obj in sample:
        messages = [{"role": "user" if t["from"] == "User" else "assistant", "content": t["value"]}
                    for t in obj["conversations"]]
        for index, label in enumerate(labels_of(obj)):
            if label is not None:
                prefixes.append({"messages": messages[: index + 1]})
                labels.append(label)
    results = http.post("/v1/score", json={"conversations": prefixes}).raise_for_status().json()["results"]
    for label, result in zip(labels, results):
        np.testing.assert_allclose([label[n] for n in ATTRIBUTE_NAMES],
                                   [result["attributes"][n] for n in ATTRIBUTE_NAMES], atol=TOL, rtol=0)
    assert sum(label is not None for obj in written for label in labels_of(obj)) > len(written)  # multi-turn


def test_annotate_round_follows_the_reference_rule(raw_run, rounded_run):
    raw = [labels_of(json.loads(line)) for line in raw_run[0].read_text().splitlines()]
    values = np.array([v for labels in raw for label in labels if label for v in label.values()])
    # The byte comparisons need every raw value clear of a rounding boundary (0.5, 1.5, 2.5, 3.5) by much
    # more than float32 noise between a padded batch and a lone sequence (~3e-6); the fixture data is so.
    inside = values[(values > 0) & (values < 4)]
    assert inside.size > 100 and np.abs(inside - np.floor(inside) - 0.5).min() > 2e-5
    rounded = [json.loads(line) for line in rounded_run.read_text().splitlines()]
    assert len(rounded) == len(raw)
    for raw_labels, obj in zip(raw, rounded):
        for raw_label, turn in zip(raw_labels, obj["conversations"]):
            if raw_label is None:
                assert turn["label"] is None
            else:  # the reference: clamp to [0, 4], then Python's round; written as integers
                assert turn["label"] == attribute_string({k: round(min(4.0, max(0.0, v))) for k, v in raw_label.items()})


def kill_midway(args: list[str], output: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *args, "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= KILL_AFTER_LINES:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the job ended before it could be killed"
    assert KILL_AFTER_LINES <= output.read_bytes().count(b"\n") < NUM_LINES - len(MALFORMED)


def test_annotate_killed_and_resumed_equals_an_uninterrupted_run(demo_app, steerlm_file, rounded_run, raw_run):
    # --round: the resumed file is byte for byte the uninterrupted one.
    out = steerlm_file.with_name("resumed_rounded.jsonl")
    args = ["annotate", "--input", str(steerlm_file), "--output", str(out), "--url", demo_app, "--round"]
    kill_midway([*args, "--concurrency", "2"], out)
    done = run_job(*args, "--concurrency", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after input line" in done.stderr
    assert out.read_bytes() == rounded_run.read_bytes()
    # Raw floats too, to float noise: with token-forest batches a prompt's raw scores depend on which prompts
    # share its batch only by rounding (~1e-6 in float32; bench/results/forest.json records it), so the
    # resumed file is the uninterrupted one line for line, labels within 1e-5.
    out = steerlm_file.with_name("resumed_raw.jsonl")
    args = ["annotate", "--input", str(steerlm_file), "--output", str(out), "--url", demo_app]
    kill_midway([*args, "--concurrency", "2"], out)
    assert run_job(*args, "--concurrency", "16").returncode == 0
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in raw_run[0].read_text().splitlines()]
    assert len(resumed) == len(uninterrupted)
    for got, want in zip(resumed, uninterrupted):
        assert without_labels(got) == without_labels(want)
        for got_label, want_label in zip(labels_of(got), labels_of(want), strict=True):
            assert (got_label is None) == (want_label is None)
            if got_label is not None:
                assert got_label.keys() == want_label.keys()
                assert max(abs(got_label[k] - want_label[k]) for k in got_label) <= 1e-5


def test_annotate_parquet_shards_get_the_labels_of_the_jsonl_file(demo_app, ray_cluster, steerlm_file, rounded_run,
                                                                  tmp_path):
    """The fixture's rows as two Parquet shards (`conversations` a list of structs), annotated into a directory
    of Parquet shards over HTTP: the rows of the JSONL run (`--round`: exactly; that run used handles from one
    process). The JSONL file into a directory on Ray Data (`--address`): the same shards, byte for byte."""
    objs = []
    for text in steerlm_file.read_text().splitlines():
        try:
            objs.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # "{not json" has no Parquet form; the other malformed lines do
    shards = tmp_path / "in"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(objs[:90]), shards / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(objs[90:]), shards / "part-b.parquet")
    out = tmp_path / "out"
    done = run_job("annotate", "--input", str(shards), "--output", str(out), "--url", demo_app, "--round",
                   "--rows-per-shard", "64", "--concurrency", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{NUM_LINES - 1} input lines: {NUM_LINES - len(MALFORMED)} written" in done.stderr
    assert len(list(out.glob("part-*.parquet"))) == 4
    expected = [json.loads(line) for line in rounded_run.read_text().splitlines()]
    assert read_output(str(out)) == expected
    on_ray_data = tmp_path / "ray_data"
    done = run_job("annotate", "--input", str(steerlm_file), "--output", str(on_ray_data), "--address",
                   ray_cluster.address, "--round", "--rows-per-shard", "64", "--batch-rows", "32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{NUM_LINES - len(MALFORMED)} written" in done.stderr and f"{len(MALFORMED)} malformed" in done.stderr
    errors = [json.loads(line) for line in (on_ray_data / ERRORS_FILE).read_text().splitlines()]
    assert [e["where"] for e in errors] == ["in.jsonl"] * len(MALFORMED)  # Ray Data's read knows no line numbers
    assert read_output(str(on_ray_data)) == expected
    assert [p.read_bytes() for p in sorted(on_ray_data.glob("part-*"))] == [p.read_bytes()
                                                                             for p in sorted(out.glob("part-*"))]


def test_annotate_refuses_output_from_another_input(demo_app, steerlm_file, tmp_path):
    out = tmp_path / "other.jsonl"
    out.write_text(json.dumps(steerlm_line(999)) + "\n")
    done = run_job("annotate", "--input", str(steerlm_file), "--output", str(out), "--url", demo_app)
    assert done.returncode == 2 and "does not come from the input" in done.stderr


def rewardbench_rows() -> list[dict]:
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-python"]
    rows = []
    for i in range(20):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"prompt": f"Explain {topic} briefly.", "subset": subsets[i % len(subsets)], "id": i,
                     "chosen": " ".join(f"{topic} fact {k}." for k in range(3 + i % 5)),
                     "rejected": " ".join(f"{topic} idea {k}!" for k in range(2 + (i * 3) % 7))})
    return rows


def test_evaluate_reports_the_accuracies_of_v1_score(http, demo_app, tmp_path):
    from jobs.evaluate import accuracy_report

    rows = rewardbench_rows()
    too_long = {"prompt": LONG_TEXT, "chosen": "a", "rejected": "b", "subset": "donotanswer"}
    lines = [json.dumps(r) for r in rows] + ["not json", json.dumps(too_long)]
    source = tmp_path / "rb.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "metrics.json"
    done = run_job("evaluate", "--input", str(source), "--output", str(out), "--url", demo_app,
                   "--rows-per-request", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rows"] == {"scored": 20, "malformed": 1, "rejected": 1}
    assert "rb.jsonl:21: malformed" in done.stderr and "rb.jsonl:22: rejected" in done.stderr
    convs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}]}
             for r in rows for k in ("chosen", "rejected")]
    scores = [x["score"] for half in (convs[:20], convs[20:])
              for x in http.post("/v1/score", json={"conversations": half}).raise_for_status().json()["results"]]
    expected = accuracy_report([(r["subset"], scores[2 * i] > scores[2 * i + 1]) for i, r in enumerate(rows)])
    for name, subset in expected["subsets"].items():
        assert report["subsets"][name]["correct"] == subset["correct"]
    assert report["overall"] == pytest.approx(expected["overall"])
    assert "overall" in done.stdout and "section Reasoning" in done.stdout


def kill_router_replica() -> None:
    import ray

    from bench.abuse import router_actor

    ray.kill(router_actor(), no_restart=True)


def wait_until_running(app_name: str = "reward", timeout_s: float = 180) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        time.sleep(0.5)
    raise TimeoutError(f"app {app_name} not RUNNING again after {timeout_s} s")


def test_annotate_survives_the_router_replica_killed_midway(demo_app, steerlm_file, rounded_run):
    """The router replica dies under an annotate run: clients see Ray's plain-text 500s and refused
    connections until Serve replaces it; the job retries them and writes the uninterrupted run's bytes
    (`--round`: raw floats of a prompt vary by ~1e-6 with its batch mates under token-forest batching)."""
    out = steerlm_file.with_name("router_killed.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "annotate", "--input", str(steerlm_file), "--output",
                             str(out), "--url", demo_app, "--round", "--concurrency", "4", "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= KILL_AFTER_LINES:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before the router could be killed"
        kill_router_replica()
        _, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        wait_until_running()
    assert proc.returncode == 0, stderr[-3000:]
    retried = int(stderr.rsplit("; ", 1)[1].split(" requests retried")[0])
    assert retried > 0, stderr[-3000:]
    assert out.read_bytes() == rounded_run.read_bytes()
