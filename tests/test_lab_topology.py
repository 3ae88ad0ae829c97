"""The lab's network itself: shape, isolation, idempotence, parallel instances, and cleanup.

Every lab here is removed by a finalizer registered before it is brought up, so a test that fails
half-way still leaves nothing behind; ``test_cleanup_*`` check exactly that, in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables and dnsmasq", allow_module_level=True)

from kzprobe.lab import Lab, destroy  # noqa: E402
from kzprobe.lab.core import NETNS_ETC, ROLES, STATE_ROOT, list_namespaces  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KZPROBE = [sys.executable, "-m", "kzprobe.cli"]


@pytest.fixture
def make_lab(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    def make(scenario: str = "method-sni-reset", instance: str | None = None) -> Lab:
        lab = Lab(scenario, instance=instance)
        request.addfinalizer(lab.down)
        return lab

    return make


def leftovers(instance: str) -> list[str]:
    """Everything of an instance still visible from the root namespace."""
    left = [ns for ns in list_namespaces() if ns.startswith(instance + "-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [ln.split(":")[1].strip() for ln in links.splitlines() if instance in ln]
    left += [str(p) for p in (STATE_ROOT / instance, *(NETNS_ETC / f"{instance}-{r}" for r in ROLES)) if p.exists()]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    left += [ln for ln in ps.splitlines() if f"/kzprobe-lab/{instance}/" in ln]
    return left


def fetch(lab: Lab, url: str) -> str:
    code = (
        "import socket,sys;from urllib.parse import urlsplit;u=urlsplit(sys.argv[1]);"
        "s=socket.create_connection((socket.gethostbyname(u.hostname),80),timeout=3);"
        "s.sendall(b'GET / HTTP/1.1\\r\\nHost: '+u.hostname.encode()+b'\\r\\nConnection: close\\r\\n\\r\\n');"
        "d=b''\nwhile (c:=s.recv(9999)): d+=c\nprint(d.decode())"
    )
    p = lab.exec("volunteer", [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=20)
    return p.stdout


def test_up_builds_an_isolated_chain_and_down_removes_it(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    root_tables_before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    lab.up()
    assert {lab.ns_name(r) for r in ROLES} <= set(list_namespaces())
    # The volunteer resolves through the ISP: /etc/netns is bind-mounted over /etc/resolv.conf.
    resolv = lab.exec("volunteer", ["cat", "/etc/resolv.conf"], capture_output=True, text=True).stdout
    assert f"nameserver {lab.isp_resolver}" in resolv
    for role in ROLES:
        routes = lab.exec(role, ["ip", "route", "show", "default"], capture_output=True, text=True)
        assert routes.stdout.strip() == "", (role, routes.stdout)
        # No route out: an address outside the lab's ranges is unreachable from every hop
        # (`ip route get` asks the kernel, it sends nothing).
        get = lab.exec(role, ["ip", "route", "get", "1.1.1.1"], capture_output=True, text=True)
        assert get.returncode != 0, (role, get.stdout)
        links = lab.exec(role, ["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert all(lab.instance in ln or ": lo:" in ln for ln in links.splitlines()), links
    # Nothing of the lab in the root namespace: no veth, no nft table.
    assert not [ln for ln in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
                if lab.instance in ln]
    assert "kzlab" not in root_tables_before
    assert "kzlab" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    # The DPI box's rules live in its own namespace.
    rules = lab.exec("bb2", ["iptables-save"], capture_output=True, text=True).stdout
    assert "tcp-reset" in rules and b"ratel.kz".hex() in rules  # hex: the SNI match
    assert "<title>mail.ru</title>" in fetch(lab, "http://mail.ru/")
    pids = [
        int(x) for r in ROLES
        for x in subprocess.run(["ip", "netns", "pids", lab.ns_name(r)], capture_output=True, text=True).stdout.split()
    ]
    assert len(pids) >= 7  # three dnsmasq, two nginx (master and worker each)

    lab.down()
    assert leftovers(lab.instance) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_ttl_sweep_sees_each_router(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab().up()
    site = lab.scenario.sites[-1]
    # UDP with a growing TTL; IP_RECVERR hands back the ICMP time-exceeded and who sent it.
    code = textwrap.dedent("""
        import socket, struct, sys, select
        hops = []
        for ttl in range(1, 5):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
            s.sendto(b"x", (sys.argv[1], 33434))
            select.select([s], [], [], 2)
            try:
                _, anc, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            except OSError:
                hops.append(None); continue
            data = anc[0][2]
            ee_type, ee_code = data[5], data[6]  # after ee_errno (4 bytes) and ee_origin
            hops.append((socket.inet_ntoa(data[20:24]), ee_type, ee_code))
        print(hops)
    """)
    out = lab.exec("volunteer", [sys.executable, "-c", code, site.address], capture_output=True, text=True).stdout
    hops = eval(out)
    assert [h[0] for h in hops[:3]] == [lab.router_address(r) for r in ("isp", "bb1", "bb2")], hops
    assert [h[1] for h in hops[:3]] == [11, 11, 11]  # ICMP time exceeded
    assert hops[3] == (site.address, 3, 3), hops  # the server itself: port unreachable


def test_up_and_down_are_idempotent_from_the_cli(request: pytest.FixtureRequest) -> None:
    inst = "kzlidem" + os.urandom(2).hex()
    request.addfinalizer(lambda: destroy(inst))
    for _ in range(2):
        p = subprocess.run([*KZPROBE, "lab", "up", "--scenario", "method-host-reset", "--instance", inst],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and f"lab {inst} up" in p.stdout, p.stderr
    st = subprocess.run([*KZPROBE, "lab", "status"], capture_output=True, text=True).stdout
    assert f"{inst}: up; scenario method-host-reset; namespaces 5/5" in st
    ex = subprocess.run([*KZPROBE, "lab", "exec", "--instance", inst, "--", "cat", "/etc/resolv.conf"],
                        capture_output=True, text=True)
    assert "198.51.100.53" in ex.stdout
    for _ in range(2):
        p = subprocess.run([*KZPROBE, "lab", "down", "--instance", inst], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    assert leftovers(inst) == []


def test_two_instances_in_parallel_do_not_collide(make_lab: Callable[..., Lab]) -> None:
    a, b = make_lab("method-ip-drop"), make_lab("method-dns-nxdomain")
    errors: list[BaseException] = []

    def up(lab: Lab) -> None:
        try:
            lab.up()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=up, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert a.instance != b.instance
    for lab in (a, b):
        assert "<title>mail.ru</title>" in fetch(lab, "http://mail.ru/")
    # Each keeps its own censorship: ip-drop in a only, nxdomain in b only.
    assert "bambuser" not in a.exec("isp", ["cat", str(a.state_dir / "dns-isp.conf")], capture_output=True,
                                    text=True).stdout
    assert "address=/livejournal.com/" in (b.state_dir / "dns-isp.conf").read_text()
    a.down()
    assert leftovers(a.instance) == []
    assert "<title>mail.ru</title>" in fetch(b, "http://mail.ru/")
    b.down()
    assert leftovers(b.instance) == []


def test_cleanup_after_a_test_that_fails_half_way(tmp_path: Path) -> None:
    inst = "kzlfail" + os.urandom(2).hex()
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        import pytest
        from kzprobe.lab import Lab

        @pytest.fixture
        def lab(request):
            lab = Lab("method-sni-drop", instance="{inst}")
            request.addfinalizer(lab.down)
            return lab.up()

        def test_fails_half_way(lab):
            assert lab.is_up()
            open("{tmp_path}/was-up", "w").write("yes")
            assert False, "boom"
    """))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 1 and "boom" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "was-up").exists()
    assert leftovers(inst) == []


def test_down_cleans_up_after_a_crash() -> None:
    inst = "kzlcrash" + os.urandom(2).hex()
    code = (f"import os; from kzprobe.lab import Lab; Lab('method-http-blockpage-injection', instance='{inst}').up();"
            "os._exit(9)")  # no finalizer, no down: a crash
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 9, p.stderr
        assert len(leftovers(inst)) > 5  # namespaces, state, orphaned servers
        out = subprocess.run([*KZPROBE, "lab", "status"], capture_output=True, text=True).stdout
        assert inst in out
        down = subprocess.run([*KZPROBE, "lab", "down", "--instance", inst], capture_output=True, text=True)
        assert down.returncode == 0, down.stderr
        assert leftovers(inst) == []
    finally:
        destroy(inst)


def test_not_root_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from kzprobe.lab.cli import lab as lab_group

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (["up"], ["down", "--all"], ["status"], ["run"], ["exec", "--", "true"]):
        r = CliRunner().invoke(lab_group, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.strip().count("\n") == 0 and "needs root" in r.output, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_expected_file_and_targets(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("kz2014").up()
    urls = lab.targets_file.read_text().split()
    assert urls == [s.url for s in lab.scenario.sites]
    exp = json.loads(lab.expected_file.read_text())
    assert {t["target"]: t["expect"] for t in exp["targets"]}["https://ratel.kz/"] == "blocked/dpi"
