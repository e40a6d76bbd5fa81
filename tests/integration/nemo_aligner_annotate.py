"""The annotation flow of NeMo-Aligner's `examples/nlp/data/steerlm/attribute_annotate.py` (NVIDIA,
Apache License 2.0), re-implemented for the tests from that script's source: the script itself cannot
run here (it imports its sibling `common.py` and `jsonlines`), so this follows its steps and its PyTriton
calls one for one.

1. A warm-up call: `get_reward(["hello world!"])`.
2. Per SteerLM line: the prompt is built turn by turn with the SteerLM templates (default system prompt,
   `<extra_id_1>User\\n..\\n`, `<extra_id_1>Assistant\\n..\\n`); at every turn with a non-null label the
   prefix so far plus `<extra_id_2>` is one input.
3. `get_reward(prefixes)`: one `FuturesModelClient(host:port, model_name)` per call, one
   `infer_batch(sentences=[1,1] bytes, add_EOS=[1,1] bool)` per prefix, submitted one at a time, then
   the futures' `rewards` rows and `exceeded` values collected in order.
4. Labels: each reward clamped to [0, 4], rounded, written as `name:value,...` in head order.
"""

from __future__ import annotations

import numpy as np
from pytriton.client import FuturesModelClient

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
STEERLM_ATTRIBUTES = ["quality", "toxicity", "humor", "creativity",
                      "helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def get_reward(sentences: list[str], url: str, model_name: str = "reward_model", add_eos: bool = False):
    """Per sentence: its reward row (a list of floats) and its `exceeded` row, in order."""
    encoded = np.char.encode(np.array(sentences)[..., np.newaxis], "utf-8")
    with FuturesModelClient(url, model_name) as client:
        futures = []
        for row in np.split(encoded, encoded.shape[0]):
            futures.append(client.infer_batch(sentences=row, add_EOS=np.ones_like(row, dtype=bool) * add_eos))
    results = [future.result() for future in futures]
    rewards = [result["rewards"].flatten().tolist() for result in results]
    exceeded = [value for result in results for value in result["exceeded"].tolist()]
    return rewards, exceeded


def labelled_prefixes(line: dict) -> list[str]:
    user = line["mask"]
    text = f"<extra_id_0>System\n{SYSTEM_PROMPT}\n"
    prefixes = []
    for turn in line["conversations"]:
        role = "User" if turn["from"] == user else "Assistant"
        text += f"<extra_id_1>{role}\n{turn['value']}\n"
        if turn.get("label") is not None:
            prefixes.append(text + "<extra_id_2>")
    return prefixes


def annotate(lines: list[dict], url: str, model_name: str = "reward_model") -> tuple[list[dict], list[list[float]]]:
    """The annotated lines and, for checking, every raw reward row in request order."""
    get_reward(["hello world!"], url, model_name)  # the script's warm-up call
    out, raw = [], []
    for line in lines:
        rewards, _ = get_reward(labelled_prefixes(line), url, model_name)
        raw.extend(rewards)
        turns = iter(rewards)
        annotated = {**line, "conversations": [dict(t) for t in line["conversations"]]}
        for turn in annotated["conversations"]:
            if turn.get("label") is not None:
                values = [round(min(4.0, max(0.0, float(r)))) for r in next(turns)]
                turn["label"] = ",".join(f"{a}:{v}" for a, v in zip(STEERLM_ATTRIBUTES, values))
        out.append(annotated)
    return out, raw
