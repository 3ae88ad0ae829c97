"""kzprobe.hardening and the helper's policy as pure functions (no sockets, no root)."""

from __future__ import annotations

import ipaddress
import resource

import pytest

from kzprobe.hardening import (
    MIN_TOKEN_BYTES,
    Auth,
    Budget,
    BudgetExceeded,
    ConcurrencyLimiter,
    ConnectionTable,
    RateLimiter,
    TokenGuard,
    budget_scope,
    client_key,
    connection_cap,
    current_budget,
    new_token,
    retry_after_header,
    scrub,
    scrub_failure,
    token_problem,
)
from kzprobe.helper.localnet import LocalNetworks, read_local_networks
from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.helper.service import INVALID_REDIRECT, POLICY_FAILURE, normalise_failure


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_burst_refill_and_charge() -> None:
    clock = Clock()
    rl = RateLimiter(rate=2, burst=4, clock=clock)
    assert [rl.take("a") for _ in range(4)] == [0, 0, 0, 0]
    wait = rl.take("a")
    assert wait == pytest.approx(0.5) and retry_after_header(wait) == "1"
    assert rl.take("b") == 0  # other clients are untouched
    clock.t += 0.5
    assert rl.take("a") == 0
    # A heavy request is charged after the fact: the client waits for it.
    rl.charge("a", 3)
    assert rl.take("a") == pytest.approx(2.0)
    clock.t += 2.0
    assert rl.take("a") == 0


def test_rate_limiter_table_is_bounded() -> None:
    rl = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(1000):
        rl.take(f"k{i}")
    assert len(rl._buckets) == 100


def test_concurrency_limiter() -> None:
    cl = ConcurrencyLimiter(2)
    assert cl.try_acquire("a") and cl.try_acquire("a") and not cl.try_acquire("a")
    assert cl.try_acquire("b")
    cl.release("a")
    assert cl.try_acquire("a")
    with pytest.raises(Exception, match="at once"), cl.slot("a"):
        pass


def test_client_key() -> None:
    # One IPv6 subscriber (/64) is one client; IPv4-mapped is the IPv4 address; a token is the same
    # client wherever it connects from, and its key does not contain the token.
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:198.51.100.7") == client_key("198.51.100.7")
    token = new_token()
    assert client_key("198.51.100.7", token) == client_key("203.0.113.9", token)
    assert token not in client_key("198.51.100.7", token)


def test_connection_cap_stays_below_the_fd_limit() -> None:
    assert connection_cap(1024, reserve=256, limit=400) == 144
    assert connection_cap(100, reserve=256, limit=20000) == 100
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert connection_cap(10**9) < soft


def test_connection_table_evicts_idle_first() -> None:
    closed: list[str] = []
    t = ConnectionTable(cap=3, per_client=2)
    assert t.open("c1", "a", lambda: closed.append("c1"))
    assert t.open("c2", "b", lambda: closed.append("c2"))
    t.busy("c1", +1)
    assert t.open("c3", "c", lambda: closed.append("c3"))
    # Full: the oldest idle one (c2; c1 is busy) makes room.
    assert t.open("c4", "d", lambda: closed.append("c4")) and closed == ["c2"]
    # A client over its share loses its own oldest idle connection, not someone else's.
    assert t.open("c5", "d", lambda: closed.append("c5"))
    assert t.open("c6", "d", lambda: closed.append("c6")) and closed[-1] in ("c4", "c5")
    # Everything busy: the newcomer is refused.
    for cid in ("c1", "c3", "c5", "c6", "c4"):
        t.busy(cid, +1)
    assert not t.open("c7", "e", lambda: closed.append("c7")) and t.refused == 1


def test_tokens() -> None:
    assert token_problem("a") and token_problem("x" * (MIN_TOKEN_BYTES - 1))
    assert token_problem("has space in it 0123456789")
    assert token_problem("x" * MIN_TOKEN_BYTES) is None
    t = new_token()
    assert len(t) >= 43 and token_problem(t) is None
    with pytest.raises(ValueError):
        TokenGuard("short")


def test_token_guard_throttles_guessing() -> None:
    clock = Clock()
    token = new_token()
    guard = TokenGuard(token, RateLimiter(rate=0.1, burst=5, clock=clock))
    assert guard.check("a", f"Bearer {token}").ok
    assert guard.check("a", None).status is Auth.MISSING  # not guessing: not counted
    statuses = [guard.check("a", f"Bearer guess{i:020d}").status for i in range(8)]
    assert statuses[:5] == [Auth.WRONG] * 5 and set(statuses[5:]) == {Auth.LOCKED}
    # Locked: even the right token is not compared until the client has waited.
    locked = guard.check("a", f"Bearer {token}")
    assert locked.status is Auth.LOCKED and locked.retry_after > 0
    assert guard.check("b", f"Bearer {token}").ok
    clock.t += 10.0
    assert guard.check("a", f"Bearer {token}").ok


def test_budget() -> None:
    b = Budget(fetches=2, bytes=100, dns_answers=3)
    b.charge_fetch()
    b.charge_fetch()
    with pytest.raises(BudgetExceeded) as e:
        b.charge_fetch()
    assert e.value.failure.startswith("unknown_failure: request budget exhausted")
    b.charge_bytes(60)
    with pytest.raises(BudgetExceeded):
        b.charge_bytes(60)
    assert b.cost() == pytest.approx(1 + 0.5 * 1 + 120 / (256 * 1024))
    assert current_budget() is None
    with budget_scope(b):
        assert current_budget() is b
    assert current_budget() is None


@pytest.mark.parametrize(("raw", "leaks"), [
    ("unknown_failure: gaierror: [Errno -2] Name or service not known", ["gaierror", "Errno"]),
    ("unknown_failure: ConnectError: connect to 10.0.0.5:8080 failed", ["10.0.0.5", "8080", "ConnectError"]),
    ("unknown_failure: OSError: cannot open /etc/resolv.conf", ["/etc/resolv.conf"]),
    ("unknown_failure: x: [fe80::1%eth0]:443 and 2001:db8::1 and db.corp.lan:5432", ["fe80", "2001:db8", "corp"]),
    ("unknown_failure: InvalidURL: bad http://intranet.corp.lan/admin?x=1", ["intranet", "admin"]),
])
def test_scrub_failure(raw: str, leaks: list[str]) -> None:
    out = scrub_failure(raw)
    assert out is not None and out.startswith("unknown_failure")
    assert not any(leak in out for leak in leaks), out


def test_scrub_keeps_vocabulary() -> None:
    for word in ("connection_reset", "generic_timeout_error", "dns_nxdomain_error", INVALID_REDIRECT):
        assert scrub_failure(word) == word
    assert scrub_failure(None) is None
    assert scrub("from 198.51.100.7 to [2001:db8::1]:443") == "from [scrubbed] to [scrubbed]"
    assert normalise_failure("unknown_failure: RefusedByPolicy: refused") == POLICY_FAILURE
    assert normalise_failure("unknown_failure: InvalidRedirect: x") == INVALID_REDIRECT


# --- the policy ----------------------------------------------------------------------------------------------
def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def test_policy_refuses_the_hosts_own_addresses_and_denied_prefixes() -> None:
    local = LocalNetworks(frozenset(_nets("203.0.113.1/32", "127.0.0.0/8")))
    lab = _nets("203.0.113.0/24", "198.51.100.0/24")
    p = Policy(local=local, lab_public=lab, deny=_nets("198.51.100.96/28"))
    assert p.allow_address("203.0.113.7")  # lab "internet"
    assert not p.allow_address("203.0.113.1")  # the host's own address
    assert not p.allow_address("::ffff:203.0.113.1")  # ... in any spelling
    assert not p.allow_address("198.51.100.99")  # --deny
    assert not Policy(allow_private=True, deny=_nets("198.51.100.96/28")).allow_address("198.51.100.99")
    # The table changes (a new address on an interface): the memoised answers follow.
    local.nets = frozenset(_nets("203.0.113.7/32"))
    assert not p.allow_address("203.0.113.7") and p.allow_address("203.0.113.1")
    with pytest.raises(PolicyError) as e:
        p.check_url("http://203.0.113.7/")
    assert str(e.value) == "refused" and e.value.code == "forbidden_address"


@pytest.mark.parametrize("url", ["http://honest.example.org:99999/", "http://" + "\u00e9" * 60 + ".example.org/",
                                 "http://xn--caf\u00e9.example.org/", "http:127.0.0.1/"])
def test_policy_rejects_unparseable_urls(url: str) -> None:
    with pytest.raises(PolicyError) as e:
        Policy().check_url(url)
    assert e.value.code == "bad_url"


def test_local_networks_from_the_kernel() -> None:
    nets = read_local_networks()
    assert ipaddress.ip_address("127.0.0.1") in LocalNetworks(nets)
    assert ipaddress.ip_address("::1") in LocalNetworks(nets)


def test_helper_http_step_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a server makes the HTTP step raise becomes that step's failure string, not a 500."""
    import trio

    from kzprobe.helper.service import HelperEngine
    from kzprobe.model import Target
    from kzprobe.probes.engine import Engine, ProbeConfig

    raised: list[BaseException] = [ValueError("Port out of range 0-65535"),
                                   RuntimeError("surprise at 198.51.100.7:8080 reading /etc/hosts")]

    async def boom(self: Engine, target: Target, url: str, address: str, **kw: object) -> object:
        raise raised.pop(0)

    monkeypatch.setattr(Engine, "_fetch", boom)
    engine = HelperEngine(ProbeConfig(system_resolver=False), Policy())
    target = Target("http://a.example.org/")

    async def step() -> object:
        return await engine._fetch(target, "http://a.example.org:99999/", "198.51.100.7", hop=1, purpose="redirect")

    first = trio.run(step)
    assert first.failure == INVALID_REDIRECT and first.data["hop"] == 1 and first.purpose == "redirect"  # type: ignore[attr-defined]
    second = trio.run(step)
    failure = second.failure  # type: ignore[attr-defined]
    assert failure.startswith("unknown_failure") and "198.51" not in failure and "/etc" not in failure, failure
