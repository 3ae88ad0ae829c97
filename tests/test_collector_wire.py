"""The collector's body validation agrees with its published JSON Schemas, on good bodies and on
bad ones (each bad example breaks exactly one rule)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest

from kzprobe.collector.wire import BadBody, parse_batch, parse_close, parse_open

UID = "0b9f8c1e-6a53-4a8e-9a43-3f8f5b1d2c77"


def schema(name: str) -> dict[str, Any]:
    return dict(json.loads(resources.files("kzprobe.collector").joinpath("schemas", name).read_text()))


def obs(**over: Any) -> dict[str, Any]:
    d = {"seq": 1, "step": "dns", "target": "https://a.example/", "domain": "a.example", "t_start": 1.0,
         "t_end": 1.5, "data": {"rcode": "NOERROR", "addresses": ["203.0.113.1"]}}
    d.update(over)
    return d


GOOD_OPEN = {"uid": UID, "software": "kzprobe", "software_version": "0.1.0", "classifier_version": None,
             "source": "live", "started": 1.0,
             "vantage": {"network_name": "KazNet", "asn": "AS9198", "country": "KZ", "no_network": False,
                         "control_configured": True},
             "targets": [{"url": "https://a.example/", "category": "NEWS"}]}
BAD_OPEN = [
    {**GOOD_OPEN, "uid": 7},
    {**GOOD_OPEN, "started": "yesterday"},
    {**GOOD_OPEN, "source": "mars"},
    {**GOOD_OPEN, "vantage": {"ip": "198.51.100.1"}},
    {**GOOD_OPEN, "vantage": {"asn": 9198}},
    {**GOOD_OPEN, "vantage": {"no_network": "no"}},
    {**GOOD_OPEN, "targets": [{"url": ""}]},
    {**GOOD_OPEN, "targets": [{"url": "https://a/", "extra": 1}]},
    {**GOOD_OPEN, "software_version": "x" * 33},
    {**GOOD_OPEN, "surprise": True},
    {k: v for k, v in GOOD_OPEN.items() if k != "started"},
]
GOOD_BATCH = {"observations": [obs(), obs(seq=2, step="tcp", address="203.0.113.1", port=443, data={}),
                               obs(seq=3, vantage="control", failure="generic_timeout_error", attempt=1)]}
BAD_BATCH = [
    {"observations": []},
    {"observations": [obs(seq=0)]},
    {"observations": [obs(seq="1")]},
    {"observations": [obs(step="ping")]},
    {"observations": [obs(vantage="helper")]},
    {"observations": [obs(port=70000)]},
    {"observations": [obs(failure="x" * 201)]},
    {"observations": [obs(attempt=-1)]},
    {"observations": [{k: v for k, v in obs().items() if k != "domain"}]},
    {"observations": [obs()], "more": 1},
    {"obs": []},
]
GOOD_CLOSE = {"ended": 2.0, "state": "done"}
BAD_CLOSE = [{"ended": 2.0, "state": "running"}, {"state": "done"}, {**GOOD_CLOSE, "x": 1}, {"ended": None,
                                                                                              "state": "done"}]
CASES = [("open_run.json", parse_open, GOOD_OPEN, BAD_OPEN), ("batch.json", parse_batch, GOOD_BATCH, BAD_BATCH),
         ("close_run.json", parse_close, GOOD_CLOSE, BAD_CLOSE)]


@pytest.mark.parametrize(("name", "parse", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_code_and_schema_agree(name: str, parse: Any, good: dict[str, Any], bad: list[dict[str, Any]]) -> None:
    validator = jsonschema.Draft202012Validator(schema(name))
    validator.check_schema(validator.schema)
    assert list(validator.iter_errors(good)) == []
    parse(json.dumps(good).encode())
    for body in bad:
        assert list(validator.iter_errors(body)), f"schema accepts {body}"
        with pytest.raises(BadBody) as info:
            parse(json.dumps(body).encode())
        assert "\n" not in info.value.reason


def test_duplicate_seq_and_contract_errors_are_one_line() -> None:
    with pytest.raises(BadBody, match="seq 1 appears twice"):
        parse_batch(json.dumps({"observations": [obs(), obs()]}).encode())
    with pytest.raises(BadBody, match=r"observations\[0\]\.data\.headers"):
        parse_batch(json.dumps({"observations": [obs(step="http", data={"headers": ["a"]})]}).encode())
