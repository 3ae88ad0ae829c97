"""Benchmark: the volunteer's engine (``kzprobe run``) against parallel curl, same targets.

    python bench/engine.py [--sizes 1000,5000] [--concurrency 100]      (root: network namespaces)

A network namespace of its own, with no link to anything: loopback, plus a veth pair (both ends inside) that
holds the lab addresses (203.0.113.1-16) and a default route, so that kzprobe's "no network"
check passes and nothing can leave.  Inside it:

- nginx (Debian's, one worker) serves HTTPS on 443 for ``*.bench.test`` with a certificate from a
  lab CA (an intermediate between root and leaf, as real sites have), plus plain HTTP on 80;
- dnsmasq answers the N names, spread over the 16 addresses, and is the namespace's resolver.

For each size it times, as whole processes in the same run:

- ``kzprobe run --targets FILE`` (system resolver, ``--ca-bundle``, ``--concurrency C``);
- the baseline: one ``curl`` process per URL, ``C`` at a time (``xargs -P``), ``--cacert``.

It prints targets/s, CPU ms per target (user + system of the process and its children), peak RSS
and the ratios to curl.  kzprobe does more per target than curl (DNS at every resolver, a TCP
connect, a TLS handshake with the chain kept, then the GET; curl does one connection), so a ratio
near 1 is the engine keeping up with a C client while measuring step by step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADDRS = [f"203.0.113.{i}" for i in range(1, 17)]


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True)


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """(CA bundle, leaf chain, leaf key): root -> intermediate -> *.bench.test."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, ikey: ec.EllipticCurvePrivateKey,
             ca: bool, san: list[str] | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in san or []]), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(ikey, hashes.SHA256())

    rk, ik, lk = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert("kzprobe bench root", rk, "kzprobe bench root", rk, True)
    inter = cert("kzprobe bench intermediate", ik, "kzprobe bench root", rk, True)
    leaf = cert("*.bench.test", lk, "kzprobe bench intermediate", ik, False, ["*.bench.test"])
    pem = serialization.Encoding.PEM
    ca, chain, key = d / "ca.pem", d / "chain.pem", d / "leaf.key"
    ca.write_bytes(root.public_bytes(pem))
    chain.write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    key.write_bytes(lk.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca, chain, key


class World:
    """The namespace, nginx and dnsmasq; torn down by close() whatever happened."""

    def __init__(self, work: Path, n_names: int) -> None:
        self.ns = f"kzb-{uuid.uuid4().hex[:8]}"
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etc = Path("/etc/netns") / self.ns
        sh("ip", "netns", "add", self.ns)
        try:
            self._up(n_names)
        except BaseException:
            self.close()
            raise

    def _up(self, n: int) -> None:
        ns = self.ns
        sh("ip", "link", "set", "lo", "up", ns=ns)
        # Both ends of the pair live in this namespace: an interface with a default route (what a
        # volunteer's machine has) that leads nowhere.  (No dummy module in every kernel.)
        sh("ip", "link", "add", "kzb0", "type", "veth", "peer", "name", "kzb1", ns=ns)
        for dev in ("kzb0", "kzb1"):
            sh("ip", "link", "set", dev, "up", ns=ns)
        for a in ADDRS:
            sh("ip", "addr", "add", f"{a}/24", "dev", "kzb0", ns=ns)
        sh("ip", "route", "add", "default", "dev", "kzb0", ns=ns)
        ca, chain, key = make_pki(self.work)
        self.ca = ca
        hosts = self.work / "hosts"
        hosts.write_text("".join(f"{ADDRS[i % len(ADDRS)]} s{i}.bench.test\n" for i in range(n)))
        dnsconf = self.work / "dnsmasq.conf"
        dnsconf.write_text("\n".join(["no-resolv", "no-hosts", f"addn-hosts={hosts}", "bind-interfaces",
                                      "listen-address=127.0.0.53", "cache-size=10000", "dns-forward-max=1000",
                                      "local-ttl=300", "port=53", "log-facility=/dev/null"]) + "\n")
        sh("ip", "addr", "add", "127.0.0.53/8", "dev", "lo", ns=ns, check=False)
        self._spawn(["dnsmasq", "--keep-in-foreground", "--user=root", "--pid-file=", "-C", str(dnsconf)])
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.53\noptions timeout:2 attempts:2\n")
        page = self.work / "www"
        page.mkdir(exist_ok=True)
        # nginx's worker drops to "nobody": the pages (not the key) must be readable by it.
        self.work.chmod(0o755)
        page.chmod(0o755)
        (page / "index.html").write_text("<!doctype html><html><head><title>bench site</title></head><body>"
                                         + "<p>kzprobe bench page</p>" * 200 + "</body></html>\n")
        conf = self.work / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
error_log {self.work}/nginx-error.log warn;
pid {self.work}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp; fastcgi_temp_path {self.work}/tmp;
  uwsgi_temp_path {self.work}/tmp; scgi_temp_path {self.work}/tmp;
  keepalive_requests 1000;
  gzip on; gzip_types text/html;
  server {{
    listen 80 backlog=4096; listen 443 ssl http2 backlog=4096;
    server_name .bench.test;
    ssl_certificate {chain}; ssl_certificate_key {key};
    root {page};
  }}
}}
""")
        (self.work / "tmp").mkdir(exist_ok=True)
        self._spawn(["nginx", "-p", str(self.work), "-c", str(conf), "-g", "daemon off;"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = sh("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca),
                   "https://s0.bench.test/", ns=ns, check=False)
            if r.stdout == "200":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the bench world did not come up: {r.stdout} {r.stderr}")

    def _spawn(self, cmd: list[str]) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        sh("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--concurrency", type=int, default=100)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from ooni_import import timed

    if os.geteuid() != 0:
        sys.exit("bench/engine.py needs root (network namespaces)")
    sizes = [int(s) for s in args.sizes.split(",")]
    venv_kz = HERE.parent / ".venv" / "bin" / "kzprobe"
    kz = str(venv_kz) if venv_kz.exists() else shutil.which("kzprobe") or "kzprobe"
    work = Path(tempfile.mkdtemp(prefix="kzprobe-bench-engine-"))
    world = World(work, max(sizes))
    print(f"machine: {os.cpu_count()} cores; concurrency {args.concurrency}; namespace {world.ns} (no route out)")
    try:
        for n in sizes:
            urls = [f"https://s{i}.bench.test/" for i in range(n)]
            tfile = work / f"targets-{n}.txt"
            tfile.write_text("\n".join(urls) + "\n")
            db = work / f"run-{n}.db"
            k_wall, k_cpu, k_rss, k = timed(["ip", "netns", "exec", world.ns, kz, "run", "--targets", str(tfile),
                                             "--ca-bundle", str(world.ca), "--concurrency", str(args.concurrency),
                                             "--db", str(db), "--format", "json", "--no-progress"])
            if k.returncode != 0:
                sys.exit(f"kzprobe run failed: {k.stderr.strip()[-400:]}")
            ok = len(re.findall(r'"status":\s*"ok"', k.stdout))
            c_wall, c_cpu, c_rss, c = timed(["ip", "netns", "exec", world.ns, "sh", "-c",
                                             f"xargs -P {args.concurrency} -n 1 curl -s -o /dev/null "
                                             f"-w '%{{http_code}}\\n' --cacert {world.ca} < {tfile}"])
            c_ok = c.stdout.split().count("200")
            print(f"{n:>6,} targets: kzprobe {n / k_wall:7.1f} targets/s, {1000 * k_cpu / n:5.2f} ms CPU/target, "
                  f"peak RSS {k_rss / 2**20:5.0f} MiB, {ok}/{n} ok | curl {n / c_wall:7.1f} targets/s, "
                  f"{1000 * c_cpu / n:5.2f} ms CPU/target, peak RSS {c_rss / 2**20:5.0f} MiB, {c_ok}/{n} HTTP 200 "
                  f"| ratio kzprobe/curl: "
                  f"throughput {c_wall / k_wall:.2f}, CPU {k_cpu / c_cpu:.2f}")
    finally:
        world.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
