"""Prefix affinity for the routes beside `/v1/score`: OpenAI chat completions, OpenRLHF's `/get_reward`, vLLM's
`/classify` and `/pooling`, and KServe `infer`. A mixin of `deployments.router.Router`.

With several router replicas, the router that received a request takes its affinity key
(`deployments.router_affinity`) and hands the route's work to the key's home router through a handle to the
Router deployment (`routed`, chosen by `PrefixAffinityRouter`), which renders, tokenizes, batches and answers
there; errors come back as the same typed errors. One router replica, or a request without a key: the work runs
here. The work methods (`_<route>_work`) take the validated request and return the route's body, so both
paths run the same code.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.http_app import as_service_error
from deployments.router_affinity import ROUTER_DEPLOYMENT

ROUTED_WORK = ("chat_completions", "get_reward", "classify", "pooling", "kserve_infer")


class AffinityRoutes:
    async def _at_home(self, route: str, payload: Any, key: str | None) -> Any:
        """The route's work (`self._<route>_work(payload)`) at the home router of `key`: here with one router
        replica or no key, else through the Router deployment's own handle."""
        if key is None or self._cfg.router.max_replicas < 2:
            return await self._work(route, payload)
        if self._routers is None:
            self._routers = serve.get_deployment_handle(
                ROUTER_DEPLOYMENT, app_name=serve.get_replica_context().app_name)
        return await self._routers.routed.remote(route, payload, affinity_key=key)

    async def routed(self, route: str, payload: Any, affinity_key: str | None = None) -> Any:
        """A route's work that another router replica handed to this one, the home of `affinity_key` (Serve's
        request router chose this replica by the key); errors leave as the typed errors callers catch."""
        self._affinity_prompts[affinity_key] = self._affinity_prompts.get(affinity_key, 0) + 1
        try:
            return await self._work(route, payload)
        except Exception as exc:
            error = as_service_error(exc)
            if error is None:
                raise
            raise error from None

    async def _work(self, route: str, payload: Any) -> Any:
        if route not in ROUTED_WORK:  # a handle caller's typo, never a route of ours
            raise ValueError(f"route {route!r} is not one of {', '.join(ROUTED_WORK)}")
        return await getattr(self, f"_{route}_work")(payload)
