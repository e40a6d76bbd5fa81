"""`serve_app.build_app` refuses, before anything is deployed, every checkpoint the replicas would refuse
(Serve would otherwise retry the failing replica forever while requests wait): a tokenizer the prompt
format cannot use, missing weight files, weights shaped unlike the architecture."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import yaml

from sharding.checkpoints.nemo import expected_tensor_shapes, stored_tensor_shapes
from demo.tokenizer import CORPUS_PATH
from sharding.checkpoints.nemo import CheckpointFormatError, NemoCheckpoint
from tests.checkpoint_writers import TINY_SHAPE, padded_vocab, reference_weights, write_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-reward", seed=0)


@pytest.fixture
def broken(demo, tmp_path) -> Path:
    """A fresh copy of the demo checkpoint for a test to break."""
    return Path(shutil.copytree(demo, tmp_path / "copy"))


def args(path: Path) -> dict:
    return {"checkpoint_path": str(path), "parallel": {"max_tokens_per_micro_batch": 8192}}


def test_the_demo_checkpoint_builds(demo):
    from serve_app import build_app

    app = build_app(args(demo))
    assert type(app).__name__ == "Application"


def test_expected_shapes_are_exactly_what_the_demo_stores(demo):
    checkpoint = NemoCheckpoint.open(demo)
    prefix = checkpoint.weights_format.key_prefix
    stored = {k[len(prefix):]: v for k, v in stored_tensor_shapes(checkpoint).items()}
    assert expected_tensor_shapes(checkpoint.arch) == stored


@pytest.mark.parametrize("backend", ["zarr", "torch_dist"])
def test_expected_shapes_match_a_nemotron_layout_checkpoint(tmp_path, backend):
    """The release's layout (layernorm1p, no linear biases, head with bias) in both backends."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    write_tokenizer(tokenizer_dir)
    size = spm.SentencePieceProcessor(model_file=str(next(tokenizer_dir.iterdir()))).get_piece_size()
    weights = reference_weights(TINY_SHAPE, padded_vocab(size), seed=3)
    path = write_checkpoint(tmp_path / backend, weights, TINY_SHAPE, backend=backend, tokenizer_from=tokenizer_dir)
    checkpoint = NemoCheckpoint.open(path)
    prefix = checkpoint.weights_format.key_prefix
    stored = {k[len(prefix):]: v for k, v in stored_tensor_shapes(checkpoint).items()}
    expected = expected_tensor_shapes(checkpoint.arch)
    assert {k: stored[k] for k in expected} == expected
    assert set(stored) - set(expected) <= {"output_layer.weight"}  # the LM head, never loaded


def _plain_sentencepiece(out: Path) -> None:
    """A tokenizer trained with the library's defaults and no chat markers: `<extra_id_0>` is several pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(CORPUS_PATH), model_writer=model, model_type="bpe", vocab_size=1500,
                                   num_threads=1, minloglevel=2)
    out.write_bytes(model.getvalue())


def test_a_tokenizer_without_the_chat_markers_fails_the_build(broken):
    from serve_app import build_app

    (tokenizer,) = [p for p in broken.iterdir() if p.name.endswith("demo_tokenizer.model")]
    _plain_sentencepiece(tokenizer)
    with pytest.raises(ValueError, match=r"<extra_id_\d>"):
        build_app(args(broken))


def test_missing_weight_files_fail_the_build(broken):
    from serve_app import build_app

    (broken / "model_weights" / ".metadata").unlink()
    with pytest.raises(CheckpointFormatError, match=r"weights .* are unreadable: .*\.metadata"):
        build_app(args(broken))
    shutil.rmtree(broken / "model_weights")
    with pytest.raises(CheckpointFormatError, match="model_weights"):
        build_app(args(broken))


def test_weights_shaped_unlike_the_config_fail_the_build_with_the_shapes(broken):
    from serve_app import build_app

    config_path = broken / "model_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["num_layers"] = 2  # the weights hold 4 layers
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointFormatError, match=r"linear_qkv.weight has shape \[4, 384, 256\], "
                                                    r"the model expects \[2, 384, 256\]"):
        build_app(args(broken))


def with_scaling(demo: Path, **sections) -> dict:
    return {**args(demo), **sections}


def test_model_autoscaling_target_above_what_the_routers_can_send_is_refused(demo):
    from serve_app import build_app

    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 7}
    with pytest.raises(ValueError, match=r"model.autoscaling.target_ongoing_requests 7 is above the 6 batches the "
                                         r"routers can keep on one model replica \(router replicas 2 x "
                                         r"max_batches_in_flight 3\)"):
        build_app(with_scaling(demo, model={"autoscaling": scaling},
                               router={"num_replicas": 2, "max_batches_in_flight": 3}))
    # The bound itself is fine, and the default target is the bound (pipeline depth 1 + 1 = 2 per router).
    build_app(with_scaling(demo, model={"autoscaling": {**scaling, "target_ongoing_requests": 6}},
                           router={"num_replicas": 2, "max_batches_in_flight": 3}))
    with pytest.raises(ValueError, match=r"target_ongoing_requests 3 is above the 2 batches .* \(router replicas 1 "
                                         r"x max_batches_in_flight 2\)"):
        build_app(with_scaling(demo, model={"autoscaling": {**scaling, "target_ongoing_requests": 3}}))


def test_router_autoscaling_target_above_its_max_ongoing_requests_is_refused(demo):
    from serve_app import build_app

    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 300}
    with pytest.raises(ValueError, match=r"router.autoscaling.target_ongoing_requests 300 is above the 256 "
                                         r"requests one router replica admits at once \(router.max_ongoing_requests\)"):
        build_app(with_scaling(demo, router={"autoscaling": scaling, "max_ongoing_requests": 256}))
    # The router's own admission bound is the limit (default 512), not Serve's per-replica delivery bound.
    build_app(with_scaling(demo, router={"autoscaling": scaling}))
