"""Every checkpoint layout the service reads, at TP1, TP2 and PP2, scores the same.

One set of reference weights (float32 values bfloat16 represents exactly) is written as: torch_dist by
megatron-core with the prefixes `model.`, `module.` and none, in a directory and packed; the released zarr
layout (bf16, TP 8 chunks, TE names, extra-state files, stored LM output layer) with each prefix, in a
directory and packed; and the zarr checkpoint converted to torch_dist by the checkpoint tool. TP2 and PP2
run as two-process gloo worlds (fresh processes, no Ray) and through the production path (MegatronEngine
worker actors on the simulated two-node cluster), including the real `configs/nemotron4_340b.yaml` pointed
at the faithful tiny copy of the release.
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group

from configs.service import ServiceConfig
from sharding.checkpoints.cli import convert, inspect_checkpoint
from sharding.local import LocalScorer
from tests.checkpoint_writers import TINY_SHAPE, TP_SPLIT_AXIS, padded_vocab, reference_weights, write_checkpoint
from tests.gloo_world import load_and_score, run_world
from tests.integration.conftest import NODE_GPUS, REPO, service_args

TOL = 1e-5
REFERENCE = "torch_dist/model./dir"
BATCH = [
    [5, 6, 7, 8, 9],
    [10, 11, 12],
    list(range(20, 120)),
    [2, 300, 301, 302, 1500, 2000, 7],
    [42],
]
# name -> (backend, key prefix, packed)
VARIANTS = {
    REFERENCE: ("torch_dist", "model.", False),
    "torch_dist/module./dir": ("torch_dist", "module.", False),
    "torch_dist/none/dir": ("torch_dist", "", False),
    "torch_dist/model./tar": ("torch_dist", "model.", True),
    "zarr/model./dir": ("zarr", "model.", False),  # the released layout
    "zarr/model./tar": ("zarr", "model.", True),  # the released layout, packed
    "zarr/module./dir": ("zarr", "module.", False),
    "zarr/none/tar": ("zarr", "", True),
}
CONVERTED = "zarr->torch_dist/model./dir"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    import sentencepiece as spm

    from tests.checkpoint_writers import write_tokenizer

    root = tmp_path_factory.mktemp("formats")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    size = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / write_tokenizer(tokenizer_dir))).get_piece_size()
    weights = reference_weights(TINY_SHAPE, padded_vocab(size), seed=7)
    out = {}
    for name, (backend, prefix, packed) in VARIANTS.items():
        target = root / (name.replace("/", "-").replace(".", "") + (".nemo" if packed else ""))
        out[name] = str(write_checkpoint(target, weights, TINY_SHAPE, backend=backend, prefix=prefix, packed=packed,
                                         tokenizer_from=tokenizer_dir))
    convert(out["zarr/model./dir"], root / "converted", quiet=True)
    out[CONVERTED] = str(root / "converted")
    return out


@pytest.fixture(scope="module")
def reference_scores(checkpoints) -> np.ndarray:
    scorer = LocalScorer(checkpoints[REFERENCE])
    try:
        return scorer.score(BATCH)
    finally:
        scorer.close()


def test_tp1_every_layout(checkpoints, reference_scores):
    for name, path in checkpoints.items():
        scorer = LocalScorer(path)
        try:
            np.testing.assert_allclose(scorer.score(BATCH), reference_scores, atol=TOL, rtol=0, err_msg=name)
        finally:
            scorer.close()


def _check_world(results: list[dict], checkpoints, reference_scores, tp: int, pp: int) -> None:
    scorer_rank = (pp - 1) * tp  # last stage, TP rank 0
    for name, path in checkpoints.items():
        got = results[scorer_rank][name]
        assert got["scores"] is not None, name
        np.testing.assert_allclose(got["scores"], reference_scores, atol=TOL, rtol=0, err_msg=f"{name} TP{tp} PP{pp}")
        # What each rank holds is what the checkpoint tool predicts for TP x PP.
        stages = inspect_checkpoint(path, tp=tp, pp=pp, dtype="float32")["per_rank"]["stages"]
        for rank, res in enumerate(results):
            assert res[name]["parameters"] == stages[rank // tp]["parameters_per_rank"], (name, rank)


def test_tp2_every_layout(checkpoints, reference_scores):
    results = run_world(2, 2, 1, load_and_score, 2, 1, checkpoints, BATCH)
    _check_world(results, checkpoints, reference_scores, tp=2, pp=1)
    for rank, res in enumerate(results):
        # megatron splits exactly the axes the release's chunking splits (TP 8 there, TP 2 here)...
        for key, axes in res["zarr/model./dir"]["split_axes"].items():
            want = TP_SPLIT_AXIS[key]
            assert axes == ([] if want is None else [want]), key
        # ...and each rank reads only its half of every split tensor, never the LM output layer.
        read = res["zarr/model./dir"]["zarr_bytes"]
        assert "model.output_layer.weight" not in read
        hidden, vocab = TINY_SHAPE["hidden_size"], padded_vocab(2048)
        assert read["model.embedding.word_embeddings.weight"] == vocab * hidden * 2 // 2
        assert read["model.decoder.final_layernorm.weight"] == hidden * 2
        assert res["zarr/module./dir"]["key_prefix"] == "module." and res["zarr/none/tar"]["key_prefix"] == ""


def test_pp2_every_layout(checkpoints, reference_scores):
    results = run_world(2, 1, 2, load_and_score, 1, 2, checkpoints, BATCH)
    _check_world(results, checkpoints, reference_scores, tp=1, pp=2)
    first, last = results[0]["zarr/model./tar"]["zarr_bytes"], results[1]["zarr/model./tar"]["zarr_bytes"]
    assert "model.embedding.word_embeddings.weight" in first and "model.rm_head.weight" in last
    assert "model.embedding.word_embeddings.weight" not in last and "model.rm_head.weight" not in first
    layer_bytes = first["model.decoder.layers.mlp.linear_fc1.weight"]
    assert layer_bytes == last["model.decoder.layers.mlp.linear_fc1.weight"] == 2 * 1024 * 256 * 2  # 2 of 4 layers


def _engine_scores(config: ServiceConfig) -> np.ndarray:
    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for

    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    engine = MegatronEngine(config, pg)
    try:
        return asyncio.run(engine.score(BATCH))
    finally:
        engine.shutdown()
        remove_placement_group(pg)


def test_engine_tp2_packed_release_layout(ray_cluster, checkpoints, reference_scores):
    """Worker actors load a packed .nemo (zarr inside) by path, each reading its slice from the archive."""
    config = ServiceConfig.model_validate(service_args(
        checkpoints["zarr/model./tar"],
        parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "max_tokens_per_micro_batch": 4096},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5},
    ))
    np.testing.assert_allclose(_engine_scores(config), reference_scores, atol=TOL, rtol=0)


def test_nemotron_config_serves_the_release_layout(ray_cluster, checkpoints, reference_scores):
    """configs/nemotron4_340b.yaml as shipped, with only the checkpoint path, the device/dtype/backend and
    the parallel sizes changed for this CPU cluster, loads the faithful tiny copy of the release."""
    from serve_app import build_app

    with open(REPO / "configs" / "nemotron4_340b.yaml") as f:
        args = copy.deepcopy(yaml.safe_load(f)["applications"][0]["args"])
    args["checkpoint_path"] = checkpoints["zarr/model./dir"]
    args["runtime"].update(device="cpu", dtype="float32", backend="gloo")
    # TP 1 on this cluster, so no sequence parallelism (it splits tokens over TP ranks; on in the config).
    args["parallel"].update(tensor_parallel_size=1, pipeline_parallel_size=2, sequence_parallel=False)
    config = ServiceConfig.model_validate(args)
    build_app(args)  # the app composes: config checked against the checkpoint's architecture
    np.testing.assert_allclose(_engine_scores(config), reference_scores, atol=TOL, rtol=0)
