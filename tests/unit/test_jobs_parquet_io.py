"""`python -m jobs annotate` and `python -m jobs evaluate` on Parquet and on directories of shards, through the
CLI and its HTTP client, against the small real HTTP server of test_jobs_score.py that answers `/v1/score` with
deterministic rewards (the service itself: tests/integration/test_jobs.py). JSONL in and out is
tests/unit/test_jobs_annotate.py's."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deployments.schemas import attribute_string
from jobs.__main__ import main
from jobs.evaluate import accuracy_report
from jobs.tables import ERRORS_FILE, ShardWriter, read_output
from tests.unit.test_jobs_score import reward, serve_fake, stop_fake


@pytest.fixture
def service():
    server = serve_fake()
    yield server
    stop_fake(server)


def job(service, command: str, *args: str) -> int:
    return main([command, *args, "--url", service.url, "--no-progress"])


def steerlm_row(i: int) -> dict:
    """Turns of 1-3 exchanges; the last assistant turn and every third one carry a label to fill."""
    turns = []
    for t in range(1 + i % 3):
        turns.append({"value": f"question {i}.{t}", "from": "User", "label": None})
        turns.append({"value": "answer " + "x" * (i + t), "from": "Assistant",
                      "label": "" if t == i % 3 or t % 3 == 0 else None})
    return {"id": i, "conversations": turns, "mask": "User", "split": "train", "score_hint": i / 4}


BAD = {  # row id -> how it is bad, and what the job reports
    5: ("user turn labelled", "malformed: conversations[0] is a User turn with a label"),
    9: ("too long", "rejected by the service: conversations[0] has 5120 tokens"),
    13: ("empty turn", "malformed: conversations[1].value must be a non-empty string"),
}


def steerlm_rows(n: int) -> list[dict]:
    rows = [steerlm_row(i) for i in range(n)]
    rows[5]["conversations"][0]["label"] = "x"
    rows[9]["conversations"][-1]["value"] = "TOO LONG"
    rows[13]["conversations"][1]["value"] = ""
    return rows


def expected_labels(row: dict) -> list[str | None]:
    """The service's attributes of each labelled turn's reply, as the label string (raw floats)."""
    return [None if t["label"] is None else attribute_string(reward(t["value"])["attributes"])
            for t in row["conversations"]]


def check_labelled(written: list[dict], source: list[dict]) -> None:
    good = [r for r in source if r["id"] not in BAD]
    assert [r["id"] for r in written] == [r["id"] for r in good]
    for got, want in zip(written, good):
        assert {k: v for k, v in got.items() if k != "conversations"} == {k: v for k, v in want.items()
                                                                         if k != "conversations"}
        assert [(t["from"], t["value"]) for t in got["conversations"]] == [(t["from"], t["value"])
                                                                           for t in want["conversations"]]
        assert [t["label"] for t in got["conversations"]] == expected_labels(want)


def test_annotate_parquet_file_to_parquet_file_keeps_the_list_of_structs(service, tmp_path, capsys):
    rows = steerlm_rows(20)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "labelled.parquet"
    assert job(service, "annotate", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
               "--max-prompts-per-request", "4") == 0
    log = capsys.readouterr().err
    table = pq.read_table(out)
    turn = pa.struct([("value", pa.string()), ("from", pa.string()), ("label", pa.string())])
    assert table.schema.field("conversations").type == pa.list_(turn)
    check_labelled(table.to_pylist(), rows)
    for row_id, (_, message) in BAD.items():
        assert f"in.parquet:row {row_id + 1}: {message}" in log
    assert "20 input lines: 17 written" in log and "2 malformed, 1 rejected" in log
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed
    # The same rows as JSONL into a JSONL file: the same labels (and the JSONL path as before).
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert job(service, "annotate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
               "--max-prompts-per-request", "4") == 0
    from_jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert from_jsonl == table.to_pylist()


def test_annotate_parquet_file_output_is_not_overwritten_or_resumed(service, tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist([steerlm_row(i) for i in range(3)]), tmp_path / "in.parquet")
    out = tmp_path / "labelled.parquet"
    out.write_bytes(b"an earlier run's file")
    assert job(service, "annotate", "--input", str(tmp_path / "in.parquet"), "--output", str(out)) == 2
    assert "labelled.parquet exists" in capsys.readouterr().err and out.read_bytes() == b"an earlier run's file"
    assert service.requests == 0
    assert job(service, "annotate", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o.jsonl"),
               "--output-format", "parquet") == 2
    assert "--output-format parquet is for a directory output" in capsys.readouterr().err


def test_annotate_directory_of_shards_to_shards_resumes_by_id(service, tmp_path, capsys):
    rows = steerlm_rows(30)
    shards = tmp_path / "in"
    (shards / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:12]), shards / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[12:]), shards / "sub" / "b.parquet")
    (shards / "_SUCCESS").write_text("")
    out = tmp_path / "out"
    args = ["--input", str(shards), "--output", str(out), "--rows-per-shard", "10"]
    assert job(service, "annotate", *args) == 0
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet",
                                                           "part-00002.parquet"]
    check_labelled(read_output(str(out)), rows)
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert [(e["where"], e["id"]) for e in errors] == [("a.parquet:row 6", 5), ("a.parquet:row 10", 9),
                                                       ("b.parquet:row 2", 13)]
    assert all(message in e["error"] for e, (_, message) in zip(errors, BAD.values()))
    assert "b.parquet:row 2: malformed" in capsys.readouterr().err
    # Killed before the second shard was complete: the rerun scores only the rows of the missing shard.
    (out / "part-00001.parquet").unlink()
    service.bodies.clear()
    assert job(service, "annotate", *args) == 0
    scored = {int(c["messages"][0]["content"].split()[1].split(".")[0]) for b in service.bodies
              for c in b["conversations"]}
    good_ids = [r["id"] for r in rows if r["id"] not in BAD]
    assert scored == set(good_ids[10:20]) | {9}  # the failed rows are tried again; 9 is the one that is sent
    assert "17 rows already in" in capsys.readouterr().err
    check_labelled(sorted(read_output(str(out)), key=lambda r: r["id"]), rows)


def test_annotate_row_without_the_id_column_fails_alone_into_jsonl_shards(service, tmp_path):
    rows = [steerlm_row(i) for i in range(4)]
    del rows[2]["id"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert job(service, "annotate", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
               "--output-format", "jsonl") == 0
    written = [json.loads(line) for line in (out / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 1, 3]
    assert [t["label"] for t in written[1]["conversations"]] == expected_labels(rows[1])
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["where"].endswith("in.jsonl:3") and "no id column 'id'" in errors[0]["error"]


def rewardbench_rows(n: int) -> list[dict]:
    subsets = ["alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm", "hep-go"]
    return [{"id": i, "prompt": f"prompt {i}", "chosen": "c" * (1 + i % 6), "rejected": "r" * (1 + (i * 5) % 7),
             "subset": subsets[i % len(subsets)], "chosen_model": "m1", "rejected_model": "m2"} for i in range(n)]


def test_evaluate_parquet_file_and_directory_give_the_jsonl_report(service, tmp_path, capsys):
    rows = rewardbench_rows(40)
    bad = [dict(rows[0], prompt=None), dict(rows[1], chosen="TOO LONG")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    shards = tmp_path / "rb"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:25] + bad), shards / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), shards / "train-00001.parquet")
    (tmp_path / "rb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = {}
    for name in ("rb.parquet", "rb", "rb.jsonl"):
        metrics = tmp_path / f"{name}.metrics.json"
        assert job(service, "evaluate", "--input", str(tmp_path / name), "--output", str(metrics),
                   "--rows-per-request", "8") == 0
        reports[name] = json.loads(metrics.read_text())
    log = capsys.readouterr().err
    expected = accuracy_report([(r["subset"], reward(r["chosen"])["score"] > reward(r["rejected"])["score"])
                                for r in rows])
    assert 0 < sum(s["correct"] for s in expected["subsets"].values()) < len(rows)
    for name, report in reports.items():
        assert {k: report[k] for k in expected} == expected, name
    assert reports["rb.parquet"]["rows"] == reports["rb.jsonl"]["rows"] == {"scored": 40, "malformed": 0, "rejected": 0}
    assert reports["rb"]["rows"] == {"scored": 40, "malformed": 1, "rejected": 1}
    assert "train-00000.parquet:row 26: malformed: `prompt` must be a non-empty string" in log
    assert "train-00000.parquet:row 27: rejected by the service: conversations[0] has 5120 tokens" in log


def test_parquet_shards_keep_columns_that_only_later_rows_have(tmp_path):
    """Rows of a JSONL input need not share their keys; a Parquet shard has every key as a column."""
    writer = ShardWriter(str(tmp_path / "out"), "parquet")
    for row in ({"id": 1, "a": "x"}, {"id": 2, "b": [1, 2]}, {"id": 3, "a": "z", "c": {"k": 1.5}}):
        writer.write(row)
    writer.close()
    assert read_output(str(tmp_path / "out")) == [{"id": 1, "a": "x", "b": None, "c": None},
                                                  {"id": 2, "a": None, "b": [1, 2], "c": None},
                                                  {"id": 3, "a": "z", "b": None, "c": {"k": 1.5}}]


def test_annotate_and_evaluate_take_filesystem_uris(service, tmp_path, capsys):
    """A `file://` URI goes through pyarrow's filesystem as `s3://` or `gs://` would (JSONL read as a table)."""
    rows = steerlm_rows(15)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    uri = f"file://{tmp_path}"
    assert job(service, "annotate", "--input", f"{uri}/in.jsonl", "--output", f"{uri}/out") == 0
    check_labelled(read_output(str(tmp_path / "out")), rows)
    assert "in.jsonl:10: rejected by the service" in capsys.readouterr().err
    assert job(service, "annotate", "--input", f"{uri}/in.jsonl", "--output", f"{uri}/out.jsonl") == 2
    assert "a .jsonl output file must be local" in capsys.readouterr().err
    pq.write_table(pa.Table.from_pylist(rewardbench_rows(10)), tmp_path / "rb.parquet")
    assert job(service, "evaluate", "--input", f"{uri}/rb.parquet", "--output", str(tmp_path / "m.json")) == 0
    assert json.loads((tmp_path / "m.json").read_text())["rows"]["scored"] == 10


def test_annotate_parquet_into_a_jsonl_file_resumes_by_line(service, tmp_path, capsys):
    """A JSONL output file from a Parquet input resumes as from a JSONL input: its lines matched against the rows."""
    rows = steerlm_rows(16)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "out.jsonl"
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--max-prompts-per-request", "3"]
    assert job(service, "annotate", *args) == 0
    expected = out.read_bytes()
    check_labelled([json.loads(line) for line in expected.splitlines()], rows)
    lines = expected.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:7]) + lines[7][:25])  # killed while writing the eighth line
    service.bodies.clear()
    assert job(service, "annotate", *args) == 0
    assert out.read_bytes() == expected
    log = capsys.readouterr().err
    assert "dropped a partial last line" in log and "resuming after input line 8" in log  # rows 0-7, 5 malformed
    scored = {int(c["messages"][0]["content"].split()[1].split(".")[0]) for b in service.bodies
              for c in b["conversations"]}
    assert scored == {i for i in range(8, 16) if i != 13}


def test_the_output_path_names_the_output_kind(tmp_path):
    from jobs.annotate_output import output_kind

    (tmp_path / "labelled.txt").write_text("")  # an existing file of any name: a JSONL file, as before Parquet
    (tmp_path / "shards.parquet").mkdir()
    assert [output_kind(str(tmp_path / name)) for name in ("a.jsonl", "a.json", "labelled.txt", "a.parquet")] == [
        "jsonl", "jsonl", "jsonl", "parquet"]
    assert [output_kind(p) for p in (str(tmp_path / "new.txt"), str(tmp_path / "out/"), "s3://b/out")] == [
        "directory"] * 3
    assert output_kind(str(tmp_path / "shards.parquet")) == "parquet"  # refused by ParquetFileOutput: it exists
