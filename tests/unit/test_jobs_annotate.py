"""The annotation job's rules with a deterministic in-process client (the service itself: integration)."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import httpx
import pytest

from configs.service import ATTRIBUTE_NAMES
from deployments.errors import InputTooLongError, ServiceError, ServiceUnavailableError
from jobs.annotate import MalformedLine, annotate, label_string, parse_line


class FakeClient:
    """Attributes derived from the scored prefix: value k of turn with n messages = n + k / 10."""

    def __init__(self, refuse: str | None = None):
        self.bodies = []
        self.refuse = refuse

    async def score(self, body):
        self.bodies.append(body)
        results = []
        for index, conv in enumerate(body["conversations"]):
            if self.refuse and self.refuse in conv["messages"][-1]["content"]:
                raise InputTooLongError(index, 5000, 4096)
            n = len(conv["messages"])
            results.append({"attributes": {name: n + k / 10 for k, name in enumerate(ATTRIBUTE_NAMES)}})
        return {"results": results}

    async def aclose(self):
        pass


def line(i: int, labels=(None, "x"), extra=None) -> str:
    turns = []
    for t, label in enumerate(labels):
        turns += [{"from": "User", "value": f"q{i}.{t}"}, {"from": "Assistant", "value": f"a{i}.{t}", "label": label}]
    return json.dumps({"conversations": turns, "mask": "User", "id": i, **(extra or {})})


def run(tmp_path, lines, client=None, **kwargs):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if not source.exists():
        source.write_text("\n".join(lines) + "\n")
    log = io.StringIO()
    summary = asyncio.run(annotate(source, out, client or FakeClient(), progress=False, log=log, **kwargs))
    return out, summary, log.getvalue()


def test_labels_every_labelled_assistant_turn_on_its_prefix(tmp_path):
    client = FakeClient()
    out, summary, _ = run(tmp_path, [line(1, labels=("x", None, "y"), extra={"keep": [1, 2]})], client)
    obj = json.loads(out.read_text())
    assert [t.get("label") for t in obj["conversations"]] == [
        None, label_string(client_values(2), False), None, None, None, label_string(client_values(6), False)]
    assert obj["keep"] == [1, 2] and obj["id"] == 1 and obj["mask"] == "User"
    assert [len(c["messages"]) for c in client.bodies[0]["conversations"]] == [2, 6]
    assert client.bodies[0]["conversations"][1]["messages"][4] == {"role": "user", "content": "q1.2"}
    assert summary.written == 1 and summary.turns_scored == 2


def client_values(n):
    return {name: n + k / 10 for k, name in enumerate(ATTRIBUTE_NAMES)}


def test_label_string_raw_and_reference_rounding():
    values = dict(zip(ATTRIBUTE_NAMES, [-0.7, 0.5, 1.5, 2.5, 3.49, 3.5, 4.7, 2.51, 0.3499999940395355]))
    assert label_string(values, False) == (
        "quality:-0.7,toxicity:0.5,humor:1.5,creativity:2.5,helpfulness:3.49,correctness:3.5,coherence:4.7,"
        "complexity:2.51,verbosity:0.3499999940395355")
    # Clamp to [0, 4], then Python's round (half to even), as NeMo-Aligner's annotator does.
    assert label_string(values, True) == (
        "quality:0,toxicity:0,humor:2,creativity:2,helpfulness:3,correctness:4,coherence:4,complexity:3,verbosity:0")


@pytest.mark.parametrize("text, fragment", [
    ("{oops", "not valid JSON"),
    (json.dumps({"mask": "User"}), "conversations"),
    (json.dumps({"conversations": [{"from": "User", "value": "q", "label": "x"}]}), "User turn with a label"),
    (json.dumps({"conversations": [{"from": "Assistant", "value": "", "label": "x"}]}), r"conversations\[0\]\.value must be"),
    (json.dumps({"conversations": [{"from": "Assistant", "value": "a", "label": 3}]}), "label must be"),
])
def test_malformed_lines(text, fragment):
    with pytest.raises(MalformedLine, match=fragment):
        parse_line(text)


def test_malformed_and_rejected_lines_are_reported_and_counted(tmp_path):
    lines = [line(1), "{oops", line(3), line(4, labels=("TOO LONG",)), line(5)]
    lines[3] = lines[3].replace("a4.0", "TOO LONG")
    out, summary, log = run(tmp_path, lines, FakeClient(refuse="TOO LONG"))
    assert [json.loads(t)["id"] for t in out.read_text().splitlines()] == [1, 3, 5]
    assert "in.jsonl:2: malformed: not valid JSON" in log and "in.jsonl:4: rejected by the service" in log
    assert (summary.written, summary.malformed, summary.rejected) == (3, 1, 1)


def test_resume_skips_done_lines_and_drops_a_partial_line(tmp_path):
    lines = [line(i) for i in range(1, 7)]
    lines[2] = "{oops"
    full, _, _ = run(tmp_path, lines)
    expected = full.read_bytes()
    done = expected.splitlines(keepends=True)
    full.write_bytes(b"".join(done[:3]) + done[3][:10])  # killed while writing the fourth output line
    client = FakeClient()
    out, summary, log = run(tmp_path, lines, client)
    assert out.read_bytes() == expected
    assert "dropped a partial last line" in log and "resuming after input line 4" in log
    assert (summary.already_done, summary.skipped_earlier, summary.written) == (3, 1, 2)
    scored = [c["messages"][-1]["content"] for b in client.bodies for c in b["conversations"]]
    assert scored == ["a5.1", "a6.1"]  # only lines 5 and 6 were scored again


def test_resume_refuses_an_output_of_another_input(tmp_path):
    (tmp_path / "out.jsonl").write_text(line(99) + "\n")
    with pytest.raises(ValueError, match="does not come from the input"):
        run(tmp_path, [line(1), line(2)])


def test_lines_share_requests_up_to_the_prompt_limit(tmp_path):
    client = FakeClient()
    run(tmp_path, [line(1, labels=("x",) * 5), line(2), line(3), line(4)], client, max_prompts_per_request=2)
    assert [len(b["conversations"]) for b in client.bodies] == [2, 2, 1, 2, 1]  # line 1 alone, then 2+3, then 4


def test_unsendable_text_is_reported_with_its_line_and_skipped(tmp_path):
    """A lone surrogate is valid JSON but not UTF-8: the line is skipped (it stopped the job before)."""
    bad = line(2).replace("a2.1", "a2\\ud800")
    out, summary, log = run(tmp_path, [line(1), bad, line(3)])
    assert [json.loads(t)["id"] for t in out.read_text().splitlines()] == [1, 3]
    assert "in.jsonl:2: malformed: conversations[3].value has text that cannot be sent as UTF-8" in log
    assert "'\\ud800'" in log and summary.malformed == 1


def test_invalid_utf8_bytes_are_reported_not_fatal(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(line(1).encode() + b"\n" + line(2).replace("a2.1", "a2\xff").encode("latin-1") + b"\n"
                       + line(3).encode() + b"\n")
    out, summary, log = run(tmp_path, [])
    assert [json.loads(t)["id"] for t in out.read_text().splitlines()] == [1, 3]
    assert "in.jsonl:2: malformed" in log and summary.malformed == 1


class FlakyTransport(httpx.AsyncBaseTransport):
    """Answers like a service whose router replica dies and comes back: transport error, Ray's plain-text 500,
    502, 503 and 504, then the real answer; our own JSON 500 is not retried."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    async def handle_async_request(self, request):
        self.calls += 1
        step = self.script.pop(0)
        if step == "drop":
            raise httpx.ConnectError("connection refused")
        if isinstance(step, tuple):
            return httpx.Response(step[0], text=step[1])
        return httpx.Response(200, json={"results": []})


def test_http_client_retries_gateway_and_proxy_errors_with_jitter(monkeypatch):
    from jobs import client as client_module

    sleeps = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds):
        # `asyncio.sleep` is patched for the whole process: record only the client's backoff, and let any other
        # event loop still running in this process (earlier tests' threads) sleep for real.
        if sys._getframe(1).f_globals.get("__name__") != client_module.__name__:
            return await real_sleep(seconds)
        sleeps.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    client = client_module.HttpScoringClient("http://service", max_retry_s=60)
    transport = FlakyTransport(["drop", (500, "Internal Server Error"), (502, "bad gateway"),
                                (503, '{"error": {"message": "busy", "type": "service_unavailable", "param": null, '
                                      '"code": 503}}'), (504, "gateway timeout"), "ok"])
    client._http = httpx.AsyncClient(base_url="http://service", transport=transport)
    assert asyncio.run(client.score({"conversations": []})) == {"results": []}
    assert transport.calls == 6 and client.retries == 5
    assert all(0 <= s <= min(10.0, 0.5 * 2**i) for i, s in enumerate(sleeps)) and len(set(sleeps)) == 5

    ours = '{"error": {"message": "internal error", "type": "internal_error", "param": null, "code": 500}}'
    client._http = httpx.AsyncClient(base_url="http://service", transport=FlakyTransport([(500, ours)]))
    with pytest.raises(ServiceError, match="internal error") as info:
        asyncio.run(client.score({"conversations": []}))
    assert not info.value.retryable

    client._http = httpx.AsyncClient(base_url="http://service", transport=FlakyTransport(["drop"] * 3))
    client.max_retry_s = 0.0
    with pytest.raises(ServiceUnavailableError, match="connection refused.*--max-retry-s 0"):  # budget spent
        asyncio.run(client.score({"conversations": []}))
