"""``kzprobe run --fingerprints`` with a ``location_found=dns`` row: the ISP resolver's answer is a
known blockpage address, and the verdict says so (loaded and matched, not just loaded).

The loopback network's ISP resolver answers poison.test with the parked server's address
(tests/support/loopnet.py); the fingerprint names that address.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CSV = ("name,scope,location_found,pattern_type,pattern,confidence_no_fp,expected_countries,source,exp_url,notes\n"
       "loop_parked_dns,isp,dns,full,{address},9,KZ,,,\n")


def test_dns_fingerprint_from_the_command_line(loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    fps = tmp_path / "dns.csv"
    fps.write_text(CSV.format(address=loopnet_lib.PARKED), encoding="utf-8")
    url = loopnet.url("poison.test")
    out = loopnet_lib.run_kzprobe(loopnet, [url], tmp_path / "fp.db", "--fingerprints", str(fps))
    assert out.returncode == 0, out.stderr
    v = out.verdicts[url]
    assert (v["status"], v["mechanism"], v["rule"], v["detail"]) == ("blocked", "dns", "dns.fingerprint",
                                                                     "dns.blockpage"), v
    assert "loop_parked_dns" in v["evidence"]["sentence"] and loopnet_lib.PARKED in v["evidence"]["sentence"]
    # Without the row the same answer is plain poisoning: the row is what the verdict rests on.
    out = loopnet_lib.run_kzprobe(loopnet, [url], tmp_path / "nofp.db")
    assert out.verdicts[url]["rule"] == "dns.poisoned", out.verdicts[url]
