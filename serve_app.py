"""The Serve application: router (HTTP ingress + handle method) -> model (placement group of megatron-core
workers) and scoring (weights, live-reconfigurable through user_config).

    serve run configs/local.yaml            # demo model, this machine
    serve run serve_app:build_app checkpoint_path=/path/to/extracted.nemo   # defaults for everything else

`build_app(args)` validates `args` as `configs.ServiceConfig` and checks it against the checkpoint's
architecture before anything is deployed, so a bad config fails at load with the numbers in the message
(a simulated accelerator's memory included: weights per GPU at that TP x PP against the card's HBM).
It also refuses, before anything is deployed, every checkpoint the replicas would later refuse: a tokenizer
the prompt format cannot use, weights missing or not shaped as the architecture says, missing files. Serve
retries a replica whose constructor raises forever (requests would wait on it with no answer); a failed
build instead marks the application DEPLOY_FAILED with the reason (`serve status`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from configs.service import ModelReplicasConfig, RouterConfig, ScoringConfig, ServiceConfig
from deployments.chat_template import prompt_format_for
from deployments.model_routing import MODEL_REQUEST_ROUTER, ROUTING_STATS_PERIOD_S
from deployments.reward_model import RewardModelDeployment
from deployments.router_affinity import ROUTER_REQUEST_ROUTER
from deployments.router import Router
from deployments.scoring import ScoringDeployment
from sharding.checkpoints.formats import check_weights_fit, open_checkpoint, output_names
from sharding.placement import placement_for

ROUTER_TARGET_ONGOING_REQUESTS = 64  # HTTP or handle requests per router replica that autoscaling aims at
ADMISSION_HEADROOM = 1024  # requests Serve delivers to a router replica past its gate's bound, to be refused there


def build_app(args: dict[str, Any]) -> Application:
    config = ServiceConfig.model_validate(args)
    checkpoint = open_checkpoint(config.checkpoint_path)
    config = config.with_output_names(output_names(checkpoint))
    config.check_against(checkpoint.arch)
    prompt_format_for(checkpoint)  # the Router builds the same prompt format; a bad tokenizer fails here
    if not config.simulated:  # a simulated device reads only the architecture and the tokenizer
        check_weights_fit(checkpoint, checkpoint.arch)  # what every worker checks before loading
    check_batching(config)
    plan = placement_for(config)
    config_json = config.model_dump(mode="json")
    model = RewardModelDeployment.options(
        placement_group_bundles=plan.bundles,
        placement_group_strategy=plan.strategy,
        ray_actor_options={"num_cpus": config.runtime.replica_cpus},
        max_ongoing_requests=config.model_max_ongoing_calls,  # batches + readiness checks
        request_router_config=RequestRouterConfig(request_router_class=MODEL_REQUEST_ROUTER,
                                                  request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
        **replica_options(config.model, target=config.model_max_ongoing_requests),
    ).bind(config_json)
    scoring = ScoringDeployment.options(user_config=scoring_user_config(config.scoring)).bind(config_json)
    # The router's own gate (deployments.admission) refuses past router.max_ongoing_requests, at once and with
    # Retry-After in the error shape; Serve delivers ADMISSION_HEADROOM more than that so the gate sees them (a
    # refusal costs microseconds). Serve's proxy queues requests briefly while it assigns them to a replica, so
    # its own bound (a plain-text 503 without Retry-After) is only the backstop, as large.
    gated = config.router.max_ongoing_requests + ADMISSION_HEADROOM
    return Router.options(
        max_ongoing_requests=gated,
        max_queued_requests=gated,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_REQUEST_ROUTER),
        **replica_options(config.router, target=ROUTER_TARGET_ONGOING_REQUESTS),
    ).bind(model, scoring, config_json)


def check_batching(config: ServiceConfig) -> None:
    """The batching settings against each other (docs/architecture.md, "Change the batching policy"); raises
    ValueError naming the numbers. Each router keeps up to `max_batches_in_flight` batches on a model replica,
    so a model replica holds at most router replicas x that many (its `max_ongoing_requests`)."""
    in_flight, routers = config.max_batches_in_flight, config.router.max_replicas
    most = config.model_max_ongoing_requests
    scaling = config.model.autoscaling
    if scaling is not None and scaling.target_ongoing_requests is not None and scaling.target_ongoing_requests > most:
        raise ValueError(
            f"model.autoscaling.target_ongoing_requests {scaling.target_ongoing_requests:g} is above the "
            f"{most} batches the routers can keep on one model replica (router replicas {routers} x "
            f"max_batches_in_flight {in_flight}): the model would never scale up"
        )
    router_most = config.router.max_ongoing_requests
    scaling = config.router.autoscaling
    if scaling is not None and scaling.target_ongoing_requests is not None and \
            scaling.target_ongoing_requests > router_most:
        raise ValueError(
            f"router.autoscaling.target_ongoing_requests {scaling.target_ongoing_requests:g} is above the "
            f"{router_most} requests one router replica admits at once (router.max_ongoing_requests): the "
            "routers would never scale up"
        )


def scoring_user_config(scoring: ScoringConfig) -> dict[str, Any]:
    """The ScoringDeployment's live weights (its `user_config`; a Serve config file's own replaces it)."""
    user_config: dict[str, Any] = {"weights": list(scoring.weights)}
    if scoring.named_weights is not None:
        user_config["named_weights"] = {name: list(vector) for name, vector in scoring.named_weights.items()}
    return user_config


def replica_options(section: ModelReplicasConfig | RouterConfig, target: float) -> dict[str, Any]:
    """`num_replicas`, or Serve's `autoscaling_config` (toward `target` ongoing requests per replica unless the
    section sets its own)."""
    scaling = section.autoscaling
    if scaling is None:
        return {"num_replicas": section.num_replicas}
    return {"autoscaling_config": {
        "min_replicas": scaling.min_replicas, "initial_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests or target,
        "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
    }}
