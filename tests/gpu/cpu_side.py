"""The float32 CPU side of the GPU tier, run in a child process with CUDA hidden.

    python -m tests.gpu.cpu_side REQUEST.json RESULT.json

`run(task, **args)` starts that child (CUDA_VISIBLE_DEVICES="") and returns its JSON result. Tasks:
  * `demo_model`: writes the demo checkpoint to `out` (`demo.write_demo_model`);
  * `demo_reference`: the same, then scores `token_batch` on it at TP1 in float32 (one right-padded batch,
    `LocalScorer.score`);
  * `format_checkpoints`: writes one set of reference weights as torch_dist, zarr and packed zarr `.nemo`.
Writing a checkpoint joins a gloo group on the CPU, which the CUDA process cannot do (see conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 300


def run(task: str, **args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"task": task, "args": args}))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "tests.gpu.cpu_side", str(request), str(result)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"cpu_side {task} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def demo_model(out: str, seed: int) -> dict:
    from demo import write_demo_model

    return {"checkpoint": str(write_demo_model(Path(out), seed=seed))}


def demo_reference(out: str, seed: int, token_batch: list[list[int]]) -> dict:
    from sharding.local import LocalScorer

    demo_model(out, seed)
    scorer = LocalScorer(out)
    try:
        return {"rewards": scorer.score(token_batch).tolist()}
    finally:
        scorer.close()


def format_checkpoints(root: str) -> dict:
    import sentencepiece as spm

    from tests.checkpoint_writers import TINY_SHAPE, padded_vocab, reference_weights, write_checkpoint, write_tokenizer

    root_dir = Path(root)
    tok = root_dir / "tok"
    tok.mkdir(parents=True)
    size = spm.SentencePieceProcessor(model_file=str(tok / write_tokenizer(tok))).get_piece_size()
    weights = reference_weights(TINY_SHAPE, padded_vocab(size), seed=5)
    return {
        "torch_dist": str(write_checkpoint(root_dir / "td", weights, TINY_SHAPE, backend="torch_dist",
                                           tokenizer_from=tok)),
        "zarr": str(write_checkpoint(root_dir / "zarr", weights, TINY_SHAPE, backend="zarr", tokenizer_from=tok)),
        "zarr-tar": str(write_checkpoint(root_dir / "zarr.nemo", weights, TINY_SHAPE, backend="zarr", packed=True,
                                         tokenizer_from=tok)),
    }


TASKS = {"demo_model": demo_model, "demo_reference": demo_reference, "format_checkpoints": format_checkpoints}


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(TASKS[request["task"]](**request["args"])))


if __name__ == "__main__":
    main()
