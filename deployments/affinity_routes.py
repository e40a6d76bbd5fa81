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

import time
from typing import Hashable

from ray import serve

from deployments.admission import RequestScope, current_scope
from deployments.http_app import as_service_error
from deployments.router_affinity import ROUTER_DEPLOYMENT

ROUTED_WORK = ("chat_completions", "get_reward", "classify", "pooling", "kserve_infer")


class AffinityRoutes:
    async def _at_home(self, route: str, payload: Any, key: str | None) -> Any:
        """The route's work (`self._<route>_work(payload)`) at the home router of `key`: here with one router
        replica or no key, else through the Router deployment's own handle."""
        if key is None or self._cfg.router.max_replicas < 2:
            return await self._work(route, payload)
        return await self._router_handle().routed.remote(route, payload, affinity_key=key, scope=carried_scope())

    def _router_handle(self) -> Any:
        """The Router deployment's own handle (made on first use): Serve's request router picks the home."""
        if self._routers is None:
            self._routers = serve.get_deployment_handle(
                ROUTER_DEPLOYMENT, app_name=serve.get_replica_context().app_name)
        return self._routers

    async def routed(self, route: str, payload: Any, affinity_key: str | None = None,
                     scope: tuple[Hashable, float | None] | None = None) -> Any:
        """A route's work that another router replica handed to this one, the home of `affinity_key` (Serve's
        request router chose this replica by the key), under the sender's tenant and what is left of its
        deadline (`scope`); errors leave as the typed errors callers catch."""
        self._affinity_prompts[affinity_key] = self._affinity_prompts.get(affinity_key, 0) + 1
        token = current_scope.set(scope_from(scope))
        try:
            return await self._work(route, payload)
        except Exception as exc:
            error = as_service_error(exc)
            if error is None:
                raise
            raise error from None
        finally:
            current_scope.reset(token)

    async def _work(self, route: str, payload: Any) -> Any:
        if route not in ROUTED_WORK:  # a handle caller's typo, never a route of ours
            raise ValueError(f"route {route!r} is not one of {', '.join(ROUTED_WORK)}")
        return await getattr(self, f"_{route}_work")(payload)


def carried_scope() -> tuple[Hashable, float | None] | None:
    """What a handed-over request keeps of its scope (`deployments.admission`): its tenant (fair shares) and
    the seconds left until its deadline (raises the 504 if none are left). None: no scope here."""
    scope = current_scope.get()
    return None if scope is None else (scope.tenant, scope.remaining_s())


def scope_from(carried: tuple[Hashable, float | None] | None) -> RequestScope:
    """The scope of a request handed to this router: its deadline counts from its arrival here."""
    tenant, timeout_s = carried if carried is not None else (None, None)
    return RequestScope(tenant=tenant, arrived_s=time.perf_counter(), timeout_s=timeout_s)
