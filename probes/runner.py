"""A whole run: targets -> engine (concurrently) -> one storage writer -> verdicts.

Why one writer: SQLite allows one writer at a time, SQLAlchemy's async layer does not support
trio, and per-step commits must not block the probes.  Steps push observations into a memory
channel; one task drains whatever is queued and commits it from a worker thread.  A target is
classified only after its observations are committed, so verdict evidence carries real ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kzprobe import errors as E
from kzprobe.analysis import Context, classify_target
from kzprobe.model import BLOCKED, INCONCLUSIVE, OK, Observation, Target, Verdict
from kzprobe.probes.control import ControlClient
from kzprobe.probes.engine import Engine, ProbeConfig
from kzprobe.storage import Store

Progress = Callable[[int, int, dict[str, int]], None]
log = logging.getLogger("kzprobe.runner")


def vantage_has_route() -> bool:
    """True when the kernel has any route that is not loopback (IPv4 or IPv6).

    Read from /proc rather than by sending packets: deciding "no network" must not itself
    touch the network.
    """
    try:
        with open("/proc/net/route", encoding="ascii") as fh:
            if any(line.split()[0] != "lo" for line in list(fh)[1:] if line.strip()):
                return True
    except OSError:
        return True  # not Linux: assume a network and let the steps tell
    try:
        with open("/proc/net/ipv6_route", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[-1] != "lo":
                    return True
    except OSError:
        pass
    return False


@dataclass
class RunResult:
    run_id: int
    verdicts: list[Verdict]
    interrupted: bool = False
    no_network: bool = False
    control_notes: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)


class _Flush:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


class Runner:
    def __init__(self, store: Store, config: ProbeConfig, *, helpers: list[str] | None = None,
                 doh: list[str] | None = None, deadline: float | None = None,
                 vantage: dict[str, Any] | None = None, progress: Progress | None = None) -> None:
        self.store = store
        self.config = config
        self.helpers = helpers or []
        self.doh = doh or []
        self.deadline = deadline
        self.vantage = vantage or {}
        self.progress = progress
        self.all_obs: list[Observation] = []
        #: The same observations by target: classifying one target must not scan the whole run.
        self.by_target: dict[str, list[Observation]] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.counts: dict[str, int] = {OK: 0, BLOCKED: 0, "down": 0, INCONCLUSIVE: 0}
        self.run_id = 0
        self.no_network = False
        self.control: ControlClient | None = None
        #: Bugs hit while measuring a target (reported, never silently dropped).
        self.internal_errors: list[str] = []

    def run(self, targets: list[Target]) -> RunResult:
        self.no_network = not vantage_has_route()
        self.run_id = self.store.new_run(
            vantage={**self.vantage, "no_network": self.no_network},
            options={"resolvers": self.config.resolvers, "helpers": self.helpers, "doh": self.doh,
                     "timeout": self.config.timeout, "concurrency": self.config.concurrency,
                     "control_sni": self.config.control_sni, "system_resolver": self.config.system_resolver})
        self.store.add_targets(self.run_id, targets)
        interrupted = False
        try:
            trio.run(self._main, targets)
        except (KeyboardInterrupt, BaseExceptionGroup) as exc:
            # trio delivers Ctrl-C through the run's nurseries: usually wrapped in a group.
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is None:
                raise
            interrupted = True
        finally:
            # Anything measured but not yet committed (interrupt) is written now.
            pending = [o for o in self.all_obs if o.id is None]
            if pending:
                self.store.add_observations(self.run_id, pending)
        verdicts = self._final_verdicts(targets)
        self.store.set_verdicts(self.run_id, verdicts)
        self.store.finish_run(self.run_id, "interrupted" if interrupted else "done")
        notes = self.control.notes if self.control else []
        return RunResult(self.run_id, verdicts, interrupted, self.no_network, notes, self.internal_errors)

    def _context(self) -> Context:
        return Context(no_network=self.no_network, control_configured=bool(self.helpers or self.doh))

    def _final_verdicts(self, targets: list[Target]) -> list[Verdict]:
        out = []
        for t in targets:
            v = self.verdicts.get(t.url)
            if v is None:
                v = classify_target(t.url, self.by_target.get(t.url, []), self._context(), domain=t.host)
            out.append(v)
        return out

    async def _main(self, targets: list[Target]) -> None:
        send, recv = trio.open_memory_channel[Observation | _Flush](math.inf)

        async def sink(o: Observation) -> None:
            self.all_obs.append(o)
            self.by_target.setdefault(o.target, []).append(o)
            send.send_nowait(o)

        async with trio.open_nursery() as root:
            root.start_soon(self._writer, recv)
            try:
                async with Engine(self.config, sink) as engine:
                    self.control = ControlClient(self.helpers, self.doh, self.config, sink, engine.trust)
                    limiter = trio.CapacityLimiter(max(1, self.config.concurrency))
                    with trio.move_on_after(self.deadline if self.deadline else math.inf):
                        async with trio.open_nursery() as n:
                            for t in targets:
                                n.start_soon(self._one, engine, t, limiter, send)
                    await self.control.aclose()
            finally:
                flush = _Flush()
                send.send_nowait(flush)
                with trio.CancelScope(shield=True):
                    await flush.event.wait()
                root.cancel_scope.cancel()

    async def _one(self, engine: Engine, target: Target, limiter: trio.CapacityLimiter,
                   send: trio.MemorySendChannel[Observation | _Flush]) -> None:
        async with limiter:
            assert self.control is not None
            control = self.control
            try:
                async with trio.open_nursery() as n:
                    def on_dns(addresses: list[str]) -> None:
                        # Control runs concurrently with the probe's own TCP/TLS/HTTP steps.
                        n.start_soon(control.fetch, target, addresses)

                    await engine.measure(target, on_dns=on_dns if control.enabled else None)
            except Exception as exc:
                # trio hands a bug over wrapped in nursery groups: report its cause, keep the trace.
                cause = E.leaf(exc)
                log.error("internal error while measuring %s", target.url, exc_info=exc)
                self.internal_errors.append(f"{target.url}: {type(cause).__name__}: {cause}")
            flush = _Flush()
            send.send_nowait(flush)
            await flush.event.wait()
            obs = self.by_target.get(target.url, [])
            v = classify_target(target.url, obs, self._context(), domain=target.host)
            self.verdicts[target.url] = v
            self.counts[v.status] = self.counts.get(v.status, 0) + 1
            if self.progress:
                self.progress(len(self.verdicts), 0, dict(self.counts))

    async def _writer(self, recv: trio.MemoryReceiveChannel[Observation | _Flush]) -> None:
        async with recv:
            while True:
                item = await recv.receive()
                batch = [item]
                while True:
                    try:
                        batch.append(recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                obs = [i for i in batch if isinstance(i, Observation)]
                if obs:
                    # Not abandoned on cancel: an in-flight commit always completes.
                    await trio.to_thread.run_sync(self.store.add_observations, self.run_id, obs)
                for i in batch:
                    if isinstance(i, _Flush):
                        i.event.set()
