"""Benchmark: the strict helper's sustained honest-request rate, alone and under each attack.

    sudo python bench/helper.py [--seconds 8] [--honest 4] [--attackers 3]

Builds the attack lab of :mod:`kzprobe.helper.attacklab` (two network namespaces, no route out),
starts one strict helper (no --allow-private, no token) with its default limits, and for a fixed
time runs ``--honest`` clients that each ask for control of the honest site in a loop, one
request at a time, honouring 429/503 + Retry-After as the probe does.  First alone, then with
each attack running from ``--attackers`` other client addresses (4 requests at a time each, as
fast as the helper lets them, ignoring Retry-After): a ``<title>`` flood, an endless body, a
dripping body, malformed Locations, 2,000 A records, a redirect loop over 8 addresses,
held-open requests, 1,000 idle connections.  Every phase uses fresh client addresses, so no
phase inherits another's rate buckets.  Prints, per attack, honest answers/s, the ratio to the
rate alone (goal >= 0.5), the 95th percentile and the slowest /v1/health answer (polled every
50 ms), and the attack requests answered (any status, mostly 429 once the attackers' buckets are
empty).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import trio

from kzprobe.helper import attacklab as L

PORT = 8790
#: The honest site by name: every honest request includes the helper's DNS lookup (through the
#: lab's resolver, which relays the 2,000-record name to its own server as a real resolver would).
#: ``--honest-by-address`` leaves DNS out.
HONEST = f"http://honest.{L.DOMAIN}/"
ATTACKS: dict[str, list[str]] = {
    "title flood": [f"http://hostile.{L.DOMAIN}/title"],
    "endless body": [f"http://hostile.{L.DOMAIN}/endless"],
    "dripping body": [f"http://hostile.{L.DOMAIN}/drip"],
    "malformed Location": [f"http://hostile.{L.DOMAIN}/loc/{k}" for k in
                           ("no-colon", "port", "idna", "scheme-only-ip", "nul")],
    "2,000 A records": [f"http://many.{L.DOMAIN}/"],
    "redirect loop x 8 addresses": [f"http://hostile.{L.DOMAIN}/loop/0"],
    "held requests": [f"http://hostile.{L.DOMAIN}/hold"],
    "idle connections": [],
}


def _health(base: str, source: str, stop: float, out: list[float]) -> None:
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as s:
        while time.monotonic() < stop:
            t = time.monotonic()
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: h\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    return
                data += chunk
            out.append(time.monotonic() - t)
            time.sleep(0.05)


async def _phase(base: str, urls: list[str] | None, seconds: float, honest: int, attackers: int,
                 sources: list[str]) -> tuple[int, int]:
    """(honest answers, attack answers) within ``seconds``."""
    ok = 0
    hostile = 0
    stop = trio.current_time() + seconds

    async def honest_loop(c: httpx.AsyncClient) -> None:
        nonlocal ok
        while trio.current_time() < stop:
            with contextlib.suppress(httpx.HTTPError):
                r = await c.post(f"{base}/v1/control", json={"url": HONEST})
                if r.status_code == 200 and trio.current_time() < stop:
                    ok += 1
                elif r.status_code in (429, 503):
                    await trio.sleep(min(5.0, float(r.headers.get("retry-after") or 1)))

    async def attack_loop(c: httpx.AsyncClient, k: int) -> None:
        nonlocal hostile
        assert urls
        i = k
        while trio.current_time() < stop:
            with contextlib.suppress(httpx.HTTPError):
                await c.post(f"{base}/v1/control", json={"url": urls[i % len(urls)], "addresses":
                                                         L.HOSTILE if "loop" in urls[0] else []})
                hostile += 1
            i += 1

    def mk(src: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(trust_env=False, timeout=30, transport=httpx.AsyncHTTPTransport(local_address=src))

    honest_clients = [mk(sources[i]) for i in range(honest)]
    attack_clients = [mk(sources[honest + i]) for i in range(attackers)] if urls else []
    held: list[trio.SocketStream] = []
    with trio.move_on_after(seconds + 15):
        async with trio.open_nursery() as n:
            for c in honest_clients:
                n.start_soon(honest_loop, c)
            for a, c in enumerate(attack_clients):
                for k in range(4):
                    n.start_soon(attack_loop, c, a * 4 + k)
            if urls == []:
                for i in range(1000):
                    sock = trio.socket.socket()
                    await sock.bind((sources[honest + i % max(1, attackers)], 0))
                    with contextlib.suppress(OSError):
                        await sock.connect((L.HOST_PUBLIC, PORT))
                        held.append(trio.SocketStream(sock))
                hostile = len(held)
    for c in [*honest_clients, *attack_clients]:
        await c.aclose()
    for st in held:
        await st.aclose()
    return ok, hostile


def run(seconds: float, honest: int, attackers: int, print_: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with L.AttackLab() as lab:
        # Per-client rate high enough that the honest clients measure the helper, not their bucket.
        base = lab.start_helper(PORT, [], name="bench-helper", token=False)
        assert lab.world is not None
        pool = iter(L.CLIENTS[1:])

        def phase(name: str, urls: list[str] | None) -> None:
            health: list[float] = []
            stop = time.monotonic() + seconds
            th = threading.Thread(target=_health, args=(base, L.CLIENTS[0], stop, health))
            th.start()
            sources = [next(pool) for _ in range(honest + attackers)]
            ok, hostile = trio.run(_phase, base, urls, seconds, honest, attackers, sources)
            th.join()
            ranked = sorted(health) or [float("nan")]
            results[name] = {"rate": ok / seconds, "health_max": ranked[-1],
                             "health_p95": ranked[int(len(ranked) * 0.95)], "attack_answers": hostile}

        lab.world.call(lambda: phase("alone", None))
        alone = results["alone"]["rate"]
        print_(f"honest requests alone: {alone:.1f}/s  (slowest health {results['alone']['health_max'] * 1000:.0f} ms)")
        print_(f"{'attack':32} {'honest/s':>9} {'ratio':>6} {'health p95':>11} {'health max':>11} "
               f"{'attack answers':>15}")
        for name, urls in ATTACKS.items():
            lab.world.call(lambda n=name, u=urls: phase(n, u))  # type: ignore[misc]
            r = results[name]
            r["ratio"] = r["rate"] / alone if alone else 0.0
            print_(f"{name:32} {r['rate']:9.1f} {r['ratio']:6.2f} {r['health_p95'] * 1000:8.0f} ms "
                   f"{r['health_max'] * 1000:8.0f} ms {r['attack_answers']:15d}")
            sys.stdout.flush()
        worst = min(results[n]["ratio"] for n in ATTACKS)
        print_(f"worst ratio under attack: {worst:.2f} (goal >= 0.5)")
        lab.remove_state()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--honest", type=int, default=4, help="honest clients, one request at a time each")
    ap.add_argument("--attackers", type=int, default=3, help="attacking client addresses, 4 requests each")
    ap.add_argument("--honest-by-address", action="store_true", help=f"ask for http://{L.HONEST}/ instead")
    args = ap.parse_args()
    if args.honest_by_address:
        global HONEST
        HONEST = f"http://{L.HONEST}/"
    run(args.seconds, args.honest, args.attackers)


if __name__ == "__main__":
    main()
