"""params.yaml and the typed config are one thing: every key mirrored, unknown keys rejected."""

import dataclasses

import pytest
import yaml

from onpolicy_core.config import ConfigError, DataConfig, Params, load_params
from tests.conftest import ROOT


def _dataclass_keys(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = _dataclass_keys(type(default)) if dataclasses.is_dataclass(default) else None
    return out


def _yaml_keys(node) -> dict:
    return {k: _yaml_keys(v) if isinstance(v, dict) else None for k, v in node.items()}


def test_real_params_yaml_loads_and_mirrors_every_field():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _yaml_keys(raw) == _dataclass_keys(Params), "params.yaml must list every config field, no more"


def test_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  n_evl: 3\n")
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['n_evl'\]"):
        load_params(path)


def test_wrong_type_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("score:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match="score.temperature: expected float"):
        load_params(path)


def test_overrides_are_typed_and_checked():
    params = load_params(ROOT / "params.yaml", ["data.n_eval=7", "score.thresholds=[-2, -4]"])
    assert params.data.n_eval == 7
    assert params.score.thresholds == [-2.0, -4.0]
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(ROOT / "params.yaml", ["score.nope=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="arithmetic"):
        DataConfig(source="x.jsonl", format="arithmetic")
    with pytest.raises(ConfigError, match="min_steps"):
        load_params(ROOT / "params.yaml", ["data.arithmetic.min_steps=5", "data.arithmetic.max_steps=2"])


def test_run_names_with_a_seed_suffix():
    from onpolicy_core.config import parse_run, run_group, run_seed

    assert parse_run("idft-original-s1") == ("idft", "original") and run_seed("idft-original-s1", 0) == 1
    assert run_seed("sft-self_distill", 7) == 7 and run_group("sft-self_distill-s12") == "sft-self_distill"
    for bad in ("idft-original-1", "idft-original-sx", "idft-nosuch-s1", "nope-original"):
        with pytest.raises(ConfigError, match="must be <method>-<data>"):
            parse_run(bad)
    with pytest.raises(ConfigError, match="twice"):
        load_params(ROOT / "params.yaml", ["train.runs=[sft-original, sft-original]"])
