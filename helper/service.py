"""The helper's measuring side: the probe engine, fenced in by the helper's policy.

Control and probe must speak one model and measure the same way, or every difference between
them would be an artefact of two implementations.  So the helper runs the very same
:class:`~kzprobe.probes.engine.Engine` (with ``vantage="control"``) and only adds fences:

* every address -- resolved by the helper or handed in by the client -- passes
  :meth:`Policy.allow_address` before any connection (the engine's ``allow`` hook);
* a name that the helper's own resolvers map only to forbidden addresses is refused outright
  (DNS rebinding: a public name pointing at 127.0.0.1 must not turn the helper into a proxy);
* HTTP redirects are fenced too: the redirect resolver drops forbidden addresses, and an httpx
  request hook refuses any request whose (pinned) address or port the policy forbids, which also
  covers a redirect to another port on an allowed address.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import httpx

from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.model import CONTROL, STEP_DNS, STEP_TCP, Observation, Target
from kzprobe.probes.engine import Engine, ProbeConfig

#: The observations of the request being served.  One engine serves all requests at once, and
#: its sink is fixed at construction; a context variable routes each observation to the request
#: whose task (or a child of it: trio copies the context into spawned tasks) produced it.
_collector: contextvars.ContextVar[list[Observation] | None] = contextvars.ContextVar(
    "kzprobe_helper_collector", default=None)


async def _route(obs: Observation) -> None:
    bucket = _collector.get()
    if bucket is not None:
        bucket.append(obs)


class RefusedByPolicy(httpx.HTTPError):
    """Raised from the httpx request hook; the HTTP step records it as its failure."""


class HelperEngine(Engine):
    def __init__(self, config: ProbeConfig, policy: Policy) -> None:
        super().__init__(config, _route, vantage=CONTROL)
        self.policy = policy

    async def __aenter__(self) -> HelperEngine:
        await super().__aenter__()
        assert self.clients is not None
        for client in (self.clients.verified, self.clients.unverified):
            hooks = client.event_hooks
            client.event_hooks = {"request": [*hooks.get("request", []), self._guard],
                                  "response": list(hooks.get("response", []))}
        return self

    async def _guard(self, request: httpx.Request) -> None:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        why = self.policy.address_refusal(url.host) or self.policy.port_refusal(port)
        if why:
            raise RefusedByPolicy(f"{url.host}:{port} refused by the helper's policy: {why}")

    async def quick_resolve(self, host: str) -> str | None:
        # Redirects to another host: an address the policy forbids means "do not follow",
        # which the HTTP step records as the redirect response itself.
        address = await super().quick_resolve(host)
        if address is None or not self.policy.allow_address(address):
            return None
        return address


@dataclass
class ControlResult:
    observations: list[Observation]
    refused: list[dict[str, str]]

    def to_json(self, version: int) -> dict[str, Any]:
        return {"version": version, "observations": [o.to_dict() for o in self.observations],
                "refused": self.refused}


class ControlService:
    """Measures one (url, addresses) request with the shared engine."""

    def __init__(self, engine: HelperEngine, policy: Policy) -> None:
        self.engine = engine
        self.policy = policy

    async def control(self, url: str, addresses: list[str]) -> ControlResult:
        self.policy.check_url(url)
        target = Target(url)
        collected: list[Observation] = []
        reset = _collector.set(collected)

        def on_dns(_all: list[str]) -> None:
            # Called after the helper's own DNS and before any connection.
            own = [str(a) for o in collected if o.step == STEP_DNS for a in o.data.get("addresses") or []]
            if own and not any(self.policy.allow_address(a) for a in own):
                shown = ", ".join(sorted(set(own))[:4])
                raise PolicyError(f"{target.host} resolves only to addresses the helper refuses ({shown})",
                                  "forbidden_address")

        try:
            refused = await self.engine.measure(target, extra_addresses=addresses, followups=False,
                                                allow=self.policy.allow_address, on_dns=on_dns)
        except BaseExceptionGroup as group:
            # on_dns runs inside the engine's nursery, so a refusal arrives wrapped in a group.
            policy = group.subgroup(PolicyError)
            if policy is None:
                raise
            leaf: BaseException = policy
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        finally:
            _collector.reset(reset)
        out = [{"address": a, "reason": self.policy.address_refusal(a) or "refused"} for a in refused]
        measured = {o.address for o in collected if o.step == STEP_TCP}
        candidates = [str(a) for o in collected if o.step == STEP_DNS for a in o.data.get("addresses") or []]
        seen = set(refused)
        for a in [*candidates, *addresses]:
            if a not in measured and a not in seen:
                seen.add(a)
                out.append({"address": a, "reason": f"over the limit of {self.engine.config.max_addresses} "
                                                    "addresses measured per request"})
        for o in collected:
            o.vantage = CONTROL
        return ControlResult(collected, out)
