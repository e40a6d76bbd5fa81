"""The scoring weights of both Serve config files are the ScoringDeployment's `user_config`, not part of the
application `args`: Serve hashes `args` into every deployment's code version, so a weights change in `args`
replaces every replica (the model included), while a `user_config` change only calls `reconfigure`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs.service import DEFAULT_WEIGHTS, ServiceConfig
from deployments.scoring import ScoringDeployment, parse_user_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["configs/local.yaml", "configs/nemotron4_340b.yaml"])
def test_weights_are_the_scoring_user_config_not_args(path):
    from ray.serve.schema import ServeDeploySchema

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load((REPO / path).read_text())).applications
    assert "weights" not in (app.args.get("scoring") or {})
    (scoring,) = [d for d in app.deployments if d.name == ScoringDeployment.name]
    assert parse_user_config(scoring.user_config, len(DEFAULT_WEIGHTS)) == DEFAULT_WEIGHTS
    # args alone still validate; names and default weights then come from the checkpoint
    assert "weights" not in ServiceConfig.model_validate(app.args).scoring.model_fields_set
