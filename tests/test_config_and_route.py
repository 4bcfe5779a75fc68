"""Config validation and the router: pure, no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydicom import Dataset

from dicom_node.config import load_config
from dicom_node.errors import ConfigError
from dicom_node.route.router import RouteFacts, decide


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_embedded_default_config_is_valid():
    config = load_config()
    assert config.node.port == 11112
    assert config.routes[0].pipeline == "ct_denoise"
    assert config.node.allow_any_caller


@pytest.mark.parametrize("data, message", [
    ({"node": {"port": 70000}}, "node.port"),
    ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
    ({"node": {"colour": "red"}}, "node.colour"),
    ({"routes": [{"name": "r", "pipeline": "p", "model": "m", "destinations": ["nowhere"],
                  "match": [{"keyword": "Modality", "equals": "CT"}]}]}, "unknown destination 'nowhere'"),
    ({"destinations": [{"name": "d", "kind": "dicom", "peer": "ghost"}]}, "unknown peer 'ghost'"),
    ({"destinations": [{"name": "d", "kind": "ftp"}]}, "destinations.0"),
    ({"destinations": [{"name": "d", "kind": "folder", "path": "x"}],
      "routes": [{"name": "r", "pipeline": "p", "model": "m", "destinations": ["d"],
                  "match": [{"keyword": "Modality", "equals": "CT", "regex": "C"}]}]},
     "exactly one operator"),
    ({"destinations": [{"name": "d", "kind": "folder", "path": "x"}],
      "routes": [{"name": "r", "pipeline": "p", "model": "m", "destinations": ["d"],
                  "match": [{"keyword": "SeriesDescription", "regex": "(unclosed"}]}]}, "bad regex"),
])
def test_invalid_config_names_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert message in str(err.value)
    assert str(tmp_path / "node.yaml") in str(err.value)


def test_unreadable_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def _routes(tmp_path: Path, matches: list[list[dict]]):
    data = {"destinations": [{"name": "d", "kind": "folder", "path": "x"}],
            "routes": [{"name": f"r{i}", "pipeline": "p", "model": "m", "destinations": ["d"],
                        "match": m} for i, m in enumerate(matches)]}
    return list(load_config(_write(tmp_path, data)).routes)


def _header(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_each_operator_matches_and_explains_misses(tmp_path):
    routes = _routes(tmp_path, [
        [{"keyword": "Modality", "equals": "MR"}],
        [{"keyword": "ImageType", "contains": "derived"}],
        [{"keyword": "SliceThickness", "range": {"min": 0.5, "max": 2}}],
        [{"keyword": "SeriesDescription", "regex": "(?i)coronary"}],
        [{"keyword": "BodyPartExamined", "one_of": ["HEART", "CHEST"]},
         {"keyword": "CallingAE", "equals": "CT1"}, {"keyword": "InstanceCount", "range": {"min": 10}}],
    ])
    header = _header(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], SliceThickness="3.0",
                     SeriesDescription="Cardiac CTA", BodyPartExamined="HEART")
    decision = decide(routes, RouteFacts(header, calling_ae="CT1", instance_count=64))
    assert decision.route is not None and decision.route.name == "r4"
    reasons = {o.route: o.reason for o in decision.outcomes}
    assert reasons["r0"] == "Modality is 'CT', not 'MR'"
    assert "does not contain 'derived'" in reasons["r1"]
    assert "3 is outside [0.5, 2.0]" in reasons["r2"]
    assert "does not match" in reasons["r3"]


def test_first_match_wins_and_unrouted_says_why(tmp_path):
    routes = _routes(tmp_path, [[{"keyword": "Modality", "equals": "CT"}],
                                [{"keyword": "Modality", "one_of": ["CT", "MR"]}]])
    assert decide(routes, RouteFacts(_header(Modality="CT"))).route.name == "r0"
    miss = decide(routes, RouteFacts(_header(Modality="US")))
    assert miss.route is None
    assert "r0: Modality is 'US'" in miss.reason
    absent = decide(routes, RouteFacts(_header()))
    assert "Modality is absent" in absent.reason


def test_present_and_numeric_equality(tmp_path):
    routes = _routes(tmp_path, [[{"keyword": "ContrastBolusAgent", "present": True},
                                 {"keyword": "SeriesNumber", "equals": 3}]])
    assert decide(routes, RouteFacts(_header(ContrastBolusAgent="x", SeriesNumber="3"))).route
    assert not decide(routes, RouteFacts(_header(SeriesNumber="3"))).route
