"""The helper's measuring side: the probe engine, fenced in by the helper's policy.

Control and probe must speak one model and measure the same way, or every difference between
them would be an artefact of two implementations.  So the helper runs the very same
:class:`~kzprobe.probes.engine.Engine` (with ``vantage="control"``) and only adds fences:

* every address -- resolved by the helper or handed in by the client -- passes
  :meth:`Policy.allow_address` before any connection (the engine's ``allow`` hook);
* a name that the helper's own resolvers map only to forbidden addresses is refused outright
  (DNS rebinding: a public name pointing at 127.0.0.1 must not turn the helper into a proxy),
  and the refusal does not say what the resolver answered;
* names are looked up as absolute names (a trailing dot), so the operator's search domains never
  complete them into names inside the operator's network;
* HTTP redirects are fenced too: the redirect resolver drops forbidden addresses, and an httpx
  request hook refuses any request whose (pinned) address or port the policy forbids, which also
  covers a redirect to another port on an allowed address;
* each request has a :class:`~kzprobe.hardening.Budget` (HTTP requests across all redirects and
  addresses, bytes downloaded), charged from the httpx hooks;
* anything a remote server can make the HTTP step raise (a ``Location`` that does not parse, a
  port of 99999, a name the IDNA codec rejects) becomes a failure string, never an exception;
* what goes back is trimmed (DNS answers, headers) and scrubbed (the helper's resolver addresses,
  endpoints and paths in ``unknown_failure`` text);
* the target kinds beyond URLs (``tcp://``, ``tor-dir://``, ``proxy+http://``...: issue 15) pass
  the same address filter, on the ports :meth:`Policy.kind_port_refusal` allows; their requests
  are fixed by the helper (a proxy is asked to ``CONNECT`` to the operator's ``--control-sni``,
  never to a name the client chose), and ``udp-dns://`` connects to nothing at all.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import httpx

from kzprobe import errors as E
from kzprobe.hardening import Budget, BudgetExceeded, current_budget, scrub_failure
from kzprobe.helper.policy import REFUSED, Policy, PolicyError, idna_problem
from kzprobe.model import CONTROL, KIND_URL, STEP_DNS, STEP_HTTP, STEP_TCP, Observation, Target, now
from kzprobe.probes import dns as dnsprobe
from kzprobe.probes import kinds
from kzprobe.probes.engine import Engine, ProbeConfig

log = logging.getLogger("kzprobe.helper")

#: OONI's failure for a redirect whose Location has no usable host (netxlite, ooni/probe#2628);
#: used for every Location the helper cannot follow because it does not parse.
INVALID_REDIRECT = "http_invalid_redirect_location_host"
#: A request the helper's own policy stopped (a redirect to a refused address or port).
POLICY_FAILURE = "unknown_failure: refused by the helper's policy"
#: What the answer says about the helper's resolvers: nothing about their addresses.
RESOLVER_LABEL = "control"
MAX_HEADERS = 32
MAX_HEADER_VALUE = 256
MAX_RESPONSES = 4
#: DNS answers kept from each lookup, before anything else looks at them (the per-request budget
#: then trims what is returned further).
DNS_KEEP = 32

#: The observations of the request being served.  One engine serves all requests at once, and
#: its sink is fixed at construction; a context variable routes each observation to the request
#: whose task (or a child of it: trio copies the context into spawned tasks) produced it.
_collector: contextvars.ContextVar[list[Observation] | None] = contextvars.ContextVar(
    "kzprobe_helper_collector", default=None)
#: The port of the kind target being served (tor-dir's on 9030...), which Policy.check_url let
#: through: its own requests may use it, where a redirect's may only use 80 and 443.
_kind_port: contextvars.ContextVar[int | None] = contextvars.ContextVar("kzprobe_helper_kind_port", default=None)


async def _route(obs: Observation) -> None:
    bucket = _collector.get()
    if bucket is not None:
        bucket.append(obs)


class RefusedByPolicy(httpx.HTTPError):
    """Raised from the httpx request hook; the HTTP step records it as its failure."""


class OverBudget(httpx.HTTPError):
    """Raised from the httpx hooks when the request's budget is spent."""


class InvalidRedirect(httpx.HTTPError):
    """A Location the helper cannot follow because it does not parse (bad host, port, IDNA)."""


#: Exception class name (as errors.failure_string spells it) -> the failure string to report.
_OWN_FAILURES = {"RefusedByPolicy": POLICY_FAILURE, "InvalidRedirect": INVALID_REDIRECT}


def normalise_failure(failure: str | None) -> str | None:
    """Our own hook exceptions to their failure strings; any other free text scrubbed."""
    if failure and failure.startswith(E.UNKNOWN + ": "):
        name, _, rest = failure[len(E.UNKNOWN) + 2:].partition(":")
        if name in _OWN_FAILURES:
            return _OWN_FAILURES[name]
        if name == "OverBudget":
            return rest.strip() or "unknown_failure: request budget exhausted"
    return scrub_failure(failure)


class _CountingStream(httpx.AsyncByteStream):
    """Charges every body byte to the request's budget as it arrives off the wire."""

    def __init__(self, inner: Any, budget: Budget) -> None:
        self.inner = inner
        self.budget = budget

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            try:
                self.budget.charge_bytes(len(chunk))
            except BudgetExceeded as exc:
                raise OverBudget(exc.failure) from None
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


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
                                  "response": [*hooks.get("response", []), self._meter]}
        return self

    def _port_refusal(self, port: int) -> str | None:
        return None if port == _kind_port.get() else self.policy.port_refusal(port)

    async def _guard(self, request: httpx.Request) -> None:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        why = self.policy.address_refusal(url.host) or self._port_refusal(port)
        if why:
            log.info("redirect refused: %s", why)
            raise RefusedByPolicy(REFUSED)
        budget = current_budget()
        if budget is not None:
            try:
                budget.charge_fetch()
            except BudgetExceeded as exc:
                raise OverBudget(exc.failure) from None

    async def _meter(self, response: httpx.Response) -> None:
        budget = current_budget()
        if budget is not None:
            response.stream = _CountingStream(response.stream, budget)

    # --- DNS: absolute names, and no resolver addresses in the answer -----------------------------
    def _lookups(self, target: Target) -> list[Awaitable[Observation]]:
        cfg, domain = self.config, target.host
        absolute = domain.rstrip(".") + "."
        out: list[Awaitable[Observation]] = []
        if cfg.system_resolver:
            out.append(self._absolute(dnsprobe.lookup_system(target.url, absolute, cfg.timeout), domain))
        for r in cfg.resolvers:
            out.append(self._absolute(dnsprobe.lookup(target.url, absolute, r, "udp", cfg.timeout, cfg.dns_window),
                                      domain))
            if cfg.dns_tcp and target.scheme != kinds.UDP_DNS:
                out.append(self._absolute(dnsprobe.lookup(target.url, absolute, r, "tcp", cfg.timeout), domain))
        return out

    async def _absolute(self, lookup: Awaitable[Observation], domain: str) -> Observation:
        obs = await lookup
        obs.domain = domain
        # Trim before the engine iterates them: a name with 2,000 A records must not cost 2,000
        # policy checks (and list scans) on the event loop, nor go back to the client.
        keep = DNS_KEEP
        budget = current_budget()
        if budget is not None and isinstance(obs.data.get("answers"), list):
            budget.seen_answers += len(obs.data["answers"])
        for key in ("answers", "addresses"):
            if isinstance(obs.data.get(key), list) and len(obs.data[key]) > keep:
                obs.data[key] = obs.data[key][:keep]
        if isinstance(obs.data.get("responses"), list):
            obs.data["responses"] = [
                {**r, "addresses": list(r.get("addresses") or [])[:keep]} if isinstance(r, dict) else r
                for r in obs.data["responses"][:MAX_RESPONSES]]
        for a in obs.data.get("answers") or []:
            if isinstance(a, dict) and isinstance(a.get("name"), str):
                a["name"] = a["name"].rstrip(".")
        if obs.data.get("resolver") != "system":
            obs.data["resolver"] = RESOLVER_LABEL
        return obs

    async def quick_resolve(self, host: str) -> str | None:
        # Redirects to another host: an address the policy forbids means "do not follow",
        # which the HTTP step records as the redirect response itself.
        if idna_problem(host):
            raise InvalidRedirect(INVALID_REDIRECT)
        try:
            address = await super().quick_resolve(host.rstrip(".") + ".")
        except (UnicodeError, ValueError):
            raise InvalidRedirect(INVALID_REDIRECT) from None
        if address is None or not self.policy.allow_address(address):
            return None
        return address

    def endpoint_refusal(self, address: str, port: int) -> str | None:
        # Redirect hops make their own TCP/TLS steps: the policy fences them too.
        return self.policy.address_refusal(address) or self._port_refusal(port)

    async def _measure_address(self, target: Target, address: str, followups: bool) -> None:
        # Backstop: whatever a step raises costs that address's remaining steps, not the whole
        # request (a 500) -- the observations made so far are kept.  Cancellation passes through.
        try:
            await super()._measure_address(target, address, followups)
        except Exception as exc:
            log.warning("measurement step raised %s", type(exc).__name__, exc_info=True)

    # --- HTTP: nothing a server sends may escape as an exception ----------------------------------
    async def _fetch(self, target: Target, url: str, address: str, **kw: Any) -> Observation:
        """Every HTTP step (the target URL, each redirect hop, follow-ups) goes through here."""
        t0 = now()
        try:
            obs = await super()._fetch(target, url, address, **kw)
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
            # Only a redirect can get here: the target URL itself passed Policy.check_url.
            log.info("unfollowable redirect from %s: %s", target.host, type(exc).__name__)
            obs = self._failed_http(target, url, address, kw, t0, INVALID_REDIRECT)
        except Exception as exc:  # a bug or a library surprise: one failed step, not a 500
            log.warning("HTTP step raised %s", type(exc).__name__, exc_info=True)
            obs = self._failed_http(target, url, address, kw, t0, normalise_failure(E.failure_string(exc)))
        obs.failure = normalise_failure(obs.failure)
        return obs

    def _failed_http(self, target: Target, url: str, address: str, kw: dict[str, Any], t0: float,
                     failure: str | None) -> Observation:
        hop = kw.get("hop")
        data: dict[str, Any] = {"url": url, "host": kw.get("host") or target.host, "redirects": []}
        if hop is not None:
            data["hop"] = hop
        obs = Observation(step=STEP_HTTP, target=target.url, domain=target.host, address=address,
                          port=target.port, t_start=t0, t_end=now(), failure=failure,
                          purpose=str(kw.get("purpose") or "measure"), attempt=int(kw.get("attempt") or 0),
                          vantage=CONTROL, data=data)
        bucket = _collector.get()
        if bucket is not None:
            bucket.append(obs)
        return obs


def _trim_observation(o: Observation, budget: Budget) -> None:
    """Cut what goes back to what a probe compares: no whole answers, headers or bodies."""
    o.failure = normalise_failure(o.failure)
    d = o.data
    if o.step == STEP_DNS:
        for key in ("answers", "addresses"):
            if isinstance(d.get(key), list):
                d[key] = d[key][:budget.dns_answers]
        if isinstance(d.get("responses"), list):
            d["responses"] = [
                {**r, "addresses": list(r.get("addresses") or [])[:budget.dns_answers]} if isinstance(r, dict) else r
                for r in d["responses"][:MAX_RESPONSES]]
    elif o.step == STEP_HTTP:
        if isinstance(d.get("headers"), dict):
            d["headers"] = {str(k)[:64]: str(v)[:MAX_HEADER_VALUE]
                            for k, v in list(d["headers"].items())[:MAX_HEADERS]}
        for key in ("url", "final_url", "redirect_to"):
            if isinstance(d.get(key), str):
                d[key] = d[key][:2048]
        if isinstance(d.get("redirects"), list):
            d["redirects"] = [str(u)[:2048] for u in d["redirects"][:11]]


@dataclass
class ControlResult:
    observations: list[Observation]
    refused: list[dict[str, str]]
    #: What the measurement cost, in plain-request units (the server charges it to the client).
    cost: float = 1.0

    def to_json(self, version: int) -> dict[str, Any]:
        return {"version": version, "observations": [o.to_dict() for o in self.observations],
                "refused": self.refused}


class ControlService:
    """Measures one (url, addresses) request with the shared engine."""

    def __init__(self, engine: HelperEngine, policy: Policy, budget: Budget | None = None) -> None:
        self.engine = engine
        self.policy = policy
        #: The template each request's budget is copied from.
        self.budget = budget or Budget()

    def _new_budget(self) -> Budget:
        b = self.budget
        return Budget(fetches=b.fetches, bytes=b.bytes, dns_answers=b.dns_answers)

    async def control(self, url: str, addresses: list[str]) -> ControlResult:
        from kzprobe.hardening import budget_scope

        self.policy.check_url(url)
        target = Target(url)
        if target.scheme == kinds.UDP_DNS:
            addresses = []  # DNS only: nothing of the client's is connected to, nor reported back
        collected: list[Observation] = []
        reset = _collector.set(collected)
        port_reset = _kind_port.set(target.port if target.kind != KIND_URL else None)

        def on_dns(_all: list[str]) -> None:
            # Called after the helper's own DNS and before any connection.
            own = [str(a) for o in collected if o.step == STEP_DNS for a in o.data.get("addresses") or []]
            if own and not any(self.policy.allow_address(a) for a in own):
                # The log may say why; the client only learns that it was refused.
                log.info("%s refused: resolves only to refused addresses", target.host)
                raise PolicyError(REFUSED, "forbidden_address")

        budget = self._new_budget()
        try:
            with budget_scope(budget):
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
            _kind_port.reset(port_reset)
        given = set(addresses)
        # Only the client's own addresses are named: a refused address that came from the helper's
        # resolver would tell the client what the operator's DNS says.
        out = [{"address": a, "reason": REFUSED} for a in refused if a in given]
        measured = {o.address for o in collected if o.step == STEP_TCP}
        # A DNS-only kind connects to nothing: its answers are the measurement, not addresses left out.
        candidates = [str(a) for o in collected if o.step == STEP_DNS for a in o.data.get("addresses") or []
                      if target.scheme != kinds.UDP_DNS]
        seen = set(refused)
        for a in [*candidates, *addresses]:
            if a not in measured and a not in seen and self.policy.allow_address(a):
                seen.add(a)
                out.append({"address": a, "reason": f"over the limit of {self.engine.config.max_addresses} "
                                                    "addresses measured per request"})
        for o in collected:
            o.vantage = CONTROL
            if o.step == STEP_DNS:
                self._hide_refused(o)
            _trim_observation(o, budget)
        return ControlResult(collected, out[:budget.dns_answers], budget.cost())

    def _hide_refused(self, o: Observation) -> None:
        """Drop addresses the policy refuses from a DNS observation (split-horizon answers stay home)."""
        d = o.data
        ok = self.policy.allow_address
        if isinstance(d.get("answers"), list):
            d["answers"] = [a for a in d["answers"] if not (isinstance(a, dict) and a.get("type") in ("A", "AAAA")
                                                            and not ok(str(a.get("data"))))]
        if isinstance(d.get("addresses"), list):
            d["addresses"] = [a for a in d["addresses"] if ok(str(a))]
        if isinstance(d.get("responses"), list):
            d["responses"] = [{**r, "addresses": [a for a in r.get("addresses") or [] if ok(str(a))]}
                              if isinstance(r, dict) else r for r in d["responses"]]
