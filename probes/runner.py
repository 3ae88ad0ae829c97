"""A whole run: targets -> engine (concurrently) -> one storage writer -> verdicts.

Why one writer: SQLite allows one writer at a time, SQLAlchemy's async layer does not support
trio, and per-step commits must not block the probes.  Steps push observations into a memory
channel; one task drains whatever is queued and commits it from a worker thread.  A target is
classified only after its observations are committed, so verdict evidence carries real ids.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from kzprobe import errors as E
from kzprobe.analysis import Context, classify_target
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import BLOCKED, INCONCLUSIVE, OK, Observation, Target, Verdict
from kzprobe.probes.control import ControlClient
from kzprobe.probes.engine import Engine, ProbeConfig
from kzprobe.runview import NOT_MEASURED, classify_measured, not_measured
from kzprobe.storage import Store
from kzprobe.storage.liveness import HEARTBEAT_EVERY

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



@functools.lru_cache(maxsize=4)
def _fingerprints(paths: tuple[str, ...]) -> Fingerprints:
    """The run's fingerprints, parsed once (the context is built for every target)."""
    return Fingerprints.default(paths)


@dataclass
class RunResult:
    run_id: int
    verdicts: list[Verdict]
    interrupted: bool = False
    no_network: bool = False
    control_notes: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)
    #: How the run ended: "done", "interrupted", "deadline" or "failed".
    state: str = "done"
    #: Targets of the run still without a completed measurement.
    not_measured: int = 0


class _Flush:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


class _Measured:
    """Writer item: the target's observations are committed, so mark it measured."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url


class _Beat:
    __slots__ = ()


_Item = Observation | _Flush | _Measured | _Beat


@contextlib.contextmanager
def _signals_deferred(seen: list[int]) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the run's rows are written, so a second Ctrl-C (or a SIGTERM
    that lands here) cannot leave a half-finished run; the signal is remembered instead."""
    def note(signum: int, _frame: object) -> None:
        seen.append(signum)

    try:
        old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (tests driving the runner from a worker)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (systemd, a container stop, plain ``kill``) ends a run exactly as Ctrl-C does.

    Re-raising it as SIGINT, rather than raising KeyboardInterrupt from a handler of our own,
    lets trio deliver it at a safe point, as it does for Ctrl-C.
    """
    def forward(_signum: int, _frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    try:
        old = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
        #: "deadline" when --deadline stopped the measuring.
        self.stopped: str | None = None
        self._writer_dead = False

    def run(self, targets: list[Target], *, resume: int | None = None) -> RunResult:
        """Measure ``targets`` in their order as a new run; or, with ``resume``, measure the
        targets of that stored run that have no completed measurement, appending to it."""
        with _sigterm_as_ctrl_c():
            return self._run(targets, resume)

    def _run(self, targets: list[Target], resume: int | None) -> RunResult:
        signals: list[int] = []
        with _signals_deferred(signals):
            self.no_network = not vantage_has_route()
            if resume is None:
                self.run_id = self.store.new_run(
                    vantage={**self.vantage, "no_network": self.no_network},
                    options={"resolvers": self.config.resolvers, "helpers": self.helpers, "doh": self.doh,
                             "timeout": self.config.timeout, "concurrency": self.config.concurrency,
                             "control_sni": self.config.control_sni,
                             "system_resolver": self.config.system_resolver})
                self.store.add_targets(self.run_id, targets, pending=True)
                todo = list(targets)
            else:
                self.run_id = resume
                self.store.claim_run(resume)
                # A target cut off mid-measurement is measured again from its first step.
                self.store.discard_partial(resume)
                todo = self.store.pending_targets(resume)
        state = "failed"
        try:
            if signals:
                raise KeyboardInterrupt
            trio.run(self._main, todo)
            state = self.stopped or "done"
        except (KeyboardInterrupt, BaseExceptionGroup) as exc:
            # trio delivers Ctrl-C through the run's nurseries: usually wrapped in a group.
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is None:
                raise
            state = "interrupted"
        finally:
            with _signals_deferred(signals):
                # Anything measured but not yet committed (interrupt) is written now.
                pending = [o for o in self.all_obs if o.id is None]
                if pending:
                    self.store.add_observations(self.run_id, pending)
                if state == "failed":
                    self.store.finish_run(self.run_id, "failed")
        with _signals_deferred(signals):
            verdicts = self._final_verdicts(state)
            self.store.set_verdicts(self.run_id, verdicts)
            self.store.finish_run(self.run_id, state)
        # A signal that arrived while the finished run was being written changes nothing: every
        # target was measured, so the run is done (and the process ends now anyway).
        notes = self.control.notes if self.control else []
        missing = sum(1 for v in verdicts if v.status == NOT_MEASURED)
        return RunResult(self.run_id, verdicts, state == "interrupted", self.no_network, notes,
                         self.internal_errors, state, missing)

    def _context(self) -> Context:
        # --fingerprints rows located at "dns" are matched against DNS answers by the classifier.
        fps = _fingerprints(tuple(self.config.fingerprints)) if self.config.fingerprints else None
        return Context(no_network=self.no_network, control_configured=bool(self.helpers or self.doh),
                       fingerprints=fps)

    def _final_verdicts(self, state: str) -> list[Verdict]:
        """Every target of the run (earlier sessions' too, after a resume), in probe order."""
        states = self.store.target_states(self.run_id)
        earlier = [t for t, measured in states if measured is not None and t.url not in self.verdicts]
        fresh = classify_measured(self.store, self.run_id, earlier, self._context()) if earlier else {}
        out = []
        for t, measured in states:
            if measured is None:
                out.append(not_measured(t, state))
            else:
                out.append(self.verdicts.get(t.url) or fresh[t.url])
        return out

    async def _main(self, targets: list[Target]) -> None:
        send, recv = trio.open_memory_channel[_Item](math.inf)

        async def sink(o: Observation) -> None:
            self.all_obs.append(o)
            self.by_target.setdefault(o.target, []).append(o)
            send.send_nowait(o)

        async with trio.open_nursery() as root:
            root.start_soon(self._writer, recv)
            root.start_soon(self._heartbeat, send)
            try:
                async with Engine(self.config, sink) as engine:
                    self.control = ControlClient(self.helpers, self.doh, self.config, sink, engine.trust)
                    with trio.move_on_after(self.deadline if self.deadline else math.inf) as dl:
                        # A fixed pool of workers taking targets from one iterator: targets start in
                        # list order (trio starts sibling tasks in no fixed order), so an
                        # interrupted run has covered the head of its list.
                        queue = iter(targets)
                        async with trio.open_nursery() as n:
                            for _ in range(min(max(1, self.config.concurrency), len(targets))):
                                n.start_soon(self._worker, engine, queue, send)
                    if dl.cancelled_caught:
                        self.stopped = "deadline"
                    await self.control.aclose()
            finally:
                flush = _Flush()
                send.send_nowait(flush)
                if not self._writer_dead:  # a dead writer releases every flush it left (no deadlock)
                    with trio.CancelScope(shield=True):
                        await flush.event.wait()
                root.cancel_scope.cancel()

    async def _heartbeat(self, send: trio.MemorySendChannel[_Item]) -> None:
        while True:
            await trio.sleep(HEARTBEAT_EVERY)
            send.send_nowait(_Beat())

    async def _worker(self, engine: Engine, queue: Iterator[Target], send: trio.MemorySendChannel[_Item]) -> None:
        for target in queue:
            await self._one(engine, target, send)

    async def _one(self, engine: Engine, target: Target, send: trio.MemorySendChannel[_Item]) -> None:
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
        send.send_nowait(_Measured(target.url))
        self.counts[v.status] = self.counts.get(v.status, 0) + 1
        if self.progress:
            self.progress(len(self.verdicts), 0, dict(self.counts))

    async def _writer(self, recv: trio.MemoryReceiveChannel[_Item]) -> None:
        try:
            await self._write_loop(recv)
        finally:
            # Whatever ended the writer (a broken database, cancellation), nobody may wait for it
            # for ever: release every flush still queued.
            self._writer_dead = True
            while True:
                try:
                    item = recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if isinstance(item, _Flush):
                    item.event.set()

    async def _write_loop(self, recv: trio.MemoryReceiveChannel[_Item]) -> None:
        while True:
            item = await recv.receive()
            batch = [item]
            while True:
                try:
                    batch.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            obs = [i for i in batch if isinstance(i, Observation)]
            done = [i.url for i in batch if isinstance(i, _Measured)]
            try:
                # Not abandoned on cancel: an in-flight commit always completes.
                if obs:
                    await trio.to_thread.run_sync(self.store.add_observations, self.run_id, obs)
                if done:
                    await trio.to_thread.run_sync(self.store.mark_measured, self.run_id, done)
                if any(isinstance(i, _Beat) for i in batch):
                    await trio.to_thread.run_sync(self.store.heartbeat, self.run_id)
            finally:
                # Released even when the commit raised: a flush taken off the channel in this
                # batch is no longer seen by _writer's drain, and its waiter (shielded, in
                # _main's finally) would otherwise wait for ever.
                for i in batch:
                    if isinstance(i, _Flush):
                        i.event.set()
