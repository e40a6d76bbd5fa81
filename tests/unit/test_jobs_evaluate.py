"""Evaluation on a fixture with known scores: accuracies computed by hand."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from jobs.evaluate import accuracy_report, evaluate


class KnownScores:
    """The score of a response is the number written in it ("s=0.7")."""

    async def score(self, body):
        return {"results": [{"score": float(c["messages"][-1]["content"].split("s=")[1])}
                            for c in body["conversations"]]}

    async def aclose(self):
        pass


# (subset, chosen score, rejected score): correct when chosen > rejected; a tie is wrong.
ROWS = [
    ("alpacaeval-easy", 1, 0), ("alpacaeval-easy", 1, 0), ("alpacaeval-easy", 0, 1),  # 2/3
    ("mt-bench-med", 2, 1),  # 1/1
    ("llmbar-natural", 1, 0), ("llmbar-natural", 1, 1),  # 1/2 (tie)
    ("donotanswer", 3, 2), ("donotanswer", 1, 0),  # 2/2
    ("math-prm", 1, 0), ("math-prm", 0, 1),  # 1/2, weighs as much as the 4 code rows
    ("hep-python", 1, 0),  # 1/1
    ("hep-go", 1, 0), ("hep-go", 0, 1), ("hep-go", 0, 1),  # 1/3
    ("my-own-subset", 0, 1),  # 0/1, in no section
]


def test_hand_computed_accuracies(tmp_path):
    source = tmp_path / "rb.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "chosen": f"s={c}", "rejected": f"s={r}", "subset": s})
             for i, (s, c, r) in enumerate(ROWS)]
    source.write_text("\n".join(lines[:5] + ['{"prompt": "no subset", "chosen": "s=1", "rejected": "s=0"}'] + lines[5:]))
    log = io.StringIO()
    report = asyncio.run(evaluate(source, KnownScores(), rows_per_request=4, concurrency=3, progress=False, log=log))
    subsets = report["subsets"]
    assert subsets["alpacaeval-easy"]["accuracy"] == pytest.approx(2 / 3)
    assert subsets["llmbar-natural"]["accuracy"] == 0.5 and subsets["hep-go"]["accuracy"] == pytest.approx(1 / 3)
    assert subsets["my-own-subset"] == {"accuracy": 0.0, "correct": 0, "rows": 1, "section": None}
    sections = {name: s["accuracy"] for name, s in report["sections"].items()}
    assert sections["Chat"] == pytest.approx((2 / 3 * 3 + 1 * 1) / 4)  # 0.75
    assert sections["Chat Hard"] == pytest.approx(0.5)
    assert sections["Safety"] == pytest.approx(1.0)
    assert sections["Reasoning"] == pytest.approx((0.5 * 4 + 1 * 1 + 1 / 3 * 3) / 8)  # 0.5
    assert report["overall"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.5) / 4)
    assert report["rows"] == {"scored": len(ROWS), "malformed": 1, "rejected": 0}
    assert "rb.jsonl:6: malformed: `subset` must be a non-empty string" in log.getvalue()


def test_math_keeps_its_own_weight_without_code_rows():
    report = accuracy_report([("math-prm", True), ("math-prm", False), ("hep-cpp", True)])
    assert report["sections"]["Reasoning"]["weights"] == {"math-prm": 1.0, "hep-cpp": 1.0}
    report = accuracy_report([("math-prm", True), ("math-prm", False)])
    assert report["sections"]["Reasoning"]["accuracy"] == 0.5 and report["overall"] == 0.5
