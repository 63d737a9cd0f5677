"""params.yaml and the typed config are one thing: every key mirrored with its type, the only
source of defaults, unknown/missing keys and values outside a closed choice rejected by name."""

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from onpolicy_core.algorithms import options
from onpolicy_core.plumbing import config as config_module
from onpolicy_core.plumbing.config import ConfigError, Params, load_params
from onpolicy_core.plumbing.presets import apply_preset, available
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def _check_types(value, tp, where: str) -> None:
    """The YAML value fits the field's type (Literal, Optional, list, tuple, dict, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None:
            assert type(None) in args, f"{where}: null for a non-optional field"
            return
        arms = [a for a in args if a is not type(None)]
        if len(arms) > 1:  # e.g. float | Literal['tuned']: one arm must fit
            problems = []
            for arm in arms:
                try:
                    return _check_types(value, arm, where)
                except AssertionError as exc:
                    problems.append(str(exc))
            raise AssertionError(f"{where}: {value!r} fits none of {arms}: {problems}")
        (tp,) = arms
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        assert isinstance(value, dict), where
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        assert sorted(value) == sorted(names), f"{where}: params.yaml keys {sorted(value)} != fields {sorted(names)}"
        for name in names:
            _check_types(value[name], hints[name], f"{where}.{name}")
    elif origin is typing.Literal:
        assert value in args, f"{where}: {value!r} not in {args}"
    elif origin in (list, tuple):
        assert isinstance(value, list), where
        item_types = args if origin is tuple else [args[0]] * len(value)
        for i, (v, t) in enumerate(zip(value, item_types)):
            _check_types(v, t, f"{where}[{i}]")
    elif origin is dict:
        assert isinstance(value, dict), where
        for k, v in value.items():
            _check_types(v, args[1], f"{where}.{k}")
    elif tp is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    else:
        assert isinstance(value, tp) and not (tp is int and isinstance(value, bool)), f"{where}: {value!r} is not {tp.__name__}"


def test_params_yaml_mirrors_every_field_with_its_type():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    _check_types(raw, Params, "params")
    assert isinstance(load_params(ROOT / "params.yaml"), Params)


def _config_classes():
    seen, todo = set(), [Params]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for tp in typing.get_type_hints(cls).values():
            for candidate in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(candidate):
                    todo.append(candidate)
    return seen


def test_no_setting_has_a_default_outside_params_yaml():
    for cls in _config_classes():
        defaulted = [f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaulted, f"{cls.__name__} defines defaults for {defaulted}; params.yaml is their one source"


def test_closed_choices_are_defined_once():
    """Literal types live in options.py (the algorithm layer) or config.py (the stages' own); no
    other module spells out a tuple of allowed values."""
    for path in (ROOT / "onpolicy_core").rglob("*.py"):
        if path.name in ("options.py", "config.py"):
            continue
        text = path.read_text()
        for name in ("LAMBDA_MODES", "TOKEN_METHODS", "NO_CORRECT_POLICIES", "TRAIN_METHODS", "GENERATION_BACKENDS",
                     "REALIGN_VARIANTS", "DATA_FORMATS", "UNVERIFIED_POLICIES", "REPORT_METRICS"):
            assert name not in text, f"{path.name} repeats the allowed-value list {name}"
    assert typing.get_args(config_module.Method) == (*typing.get_args(options.TokenMethod), *typing.get_args(options.PreferenceMethod))


@pytest.mark.parametrize("preset", available(ROOT / "presets"))
def test_every_preset_loads(tmp_path, preset):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    loaded = apply_preset(preset, params, ROOT / "presets")
    assert load_params(params) == loaded


def test_unknown_and_missing_keys_are_rejected(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["n_evl"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['n_evl'\]"):
        load_params(path)
    del raw["data"]["n_evl"], raw["score"]["chunk_size"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"score: missing key\(s\) \['chunk_size'\]"):
        load_params(path)


def test_wrong_types_and_choices_are_rejected_by_key():
    with pytest.raises(ConfigError, match="score.temperature: expected float"):
        load_params(ROOT / "params.yaml", ["score.temperature=hot"])
    with pytest.raises(ConfigError, match=r"realign.mixing.hinted.lambda_mode: must be one of \['linear', 'sigmoid', 'piecewise'\]"):
        load_params(ROOT / "params.yaml", ["realign.mixing.hinted.lambda_mode=cosine"])
    with pytest.raises(ConfigError, match="eval.backend: must be one of"):
        load_params(ROOT / "params.yaml", ["eval.backend=tgi"])
    with pytest.raises(ConfigError, match="realign.decoding: temperature must be > 0"):
        load_params(ROOT / "params.yaml", ["realign.decoding.temperature=0"])
    with pytest.raises(ConfigError, match="train.idft: IDFT needs beta > 0"):
        load_params(ROOT / "params.yaml", ["train.idft.beta=0"])


def test_overrides_are_typed_and_checked():
    params = load_params(ROOT / "params.yaml", ["data.n_eval=7", "score.thresholds=[-2, -4]"])
    assert params.data.n_eval == 7
    assert params.score.thresholds == [-2.0, -4.0]
    assert params.realign.mixing.hinted.piecewise_bounds == (0.3, 0.7)
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(ROOT / "params.yaml", ["score.nope=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="arithmetic"):
        load_params(ROOT / "params.yaml", ["data.source=x.jsonl"])
    with pytest.raises(ConfigError, match="min_steps"):
        load_params(ROOT / "params.yaml", ["data.arithmetic.min_steps=5", "data.arithmetic.max_steps=2"])
    with pytest.raises(ConfigError, match="self_distill must be lambda_mode linear with beta 0"):
        load_params(ROOT / "params.yaml", ["realign.mixing.self_distill.beta=0.5"])


def test_run_names_and_their_dvc_entries(tmp_path):
    from onpolicy_core.plumbing.config import parse_run, run_group, run_seed

    assert parse_run("idft-original-s1") == ("idft", "original") and run_seed("idft-original-s1", 0) == 1
    assert parse_run("eaft_full-hinted") == ("eaft_full", "hinted")
    assert run_seed("sft-self_distill", 7) == 7 and run_group("sft-self_distill-s12") == "sft-self_distill"
    for bad in ("idft-original-1", "idft-original-sx", "idft-nosuch-s1", "nope-original"):
        with pytest.raises(ConfigError, match="must be <method>-<data>"):
            parse_run(bad)
    with pytest.raises(ConfigError, match=r"train.runs.sft-original.params must be 'train.common'"):
        load_params(ROOT / "params.yaml", ["train.runs.sft-original.params=train.idft"])
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["runs"]["idft-hinted"]["data"] = "artifacts/data/train.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.runs.idft-hinted.data must be 'artifacts/realign/hinted/train.jsonl'"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_survives_a_dvc_style_round_trip(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with its own YAML dumper: the result must load the same."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    doc = yaml_rt.load((ROOT / "params.yaml").read_text())
    doc["train"]["idft"]["beta"] = 0.5
    out = tmp_path / "params.yaml"
    with out.open("w") as fh:
        yaml_rt.dump(doc, fh)
    assert load_params(out).train.idft.beta == 0.5
    assert dataclasses.replace(load_params(out).train.idft, beta=1.0) == load_params(ROOT / "params.yaml").train.idft


def test_default_params_is_the_project_file():
    assert config_module.PROJECT_PARAMS == ROOT / "params.yaml" and Path(config_module.PROJECT_PARAMS).exists()


@pytest.mark.parametrize("preset", [None, *available(ROOT / "presets")])
def test_a_dvc_set_param_change_is_a_one_line_diff(tmp_path, preset):
    """`dvc exp run -S key=value` rewrites params.yaml with DVC's own YAML writer: params.yaml (and
    what `onpolicy preset` writes) is already in that form, so only the changed line differs."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    if preset:
        apply_preset(preset, params, ROOT / "presets")
    before = params.read_text().splitlines()
    apply_overrides(str(params), ["train.idft.beta=0.5"])
    after = params.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1, changed[:5]
    assert "beta: 0.5" in changed[0][1]


def test_learning_rates_are_a_number_or_tuned_for_every_method_of_the_runs(tmp_path):
    p = load_params(ROOT / "params.yaml", ["tune.learning_rates.sft.rate=tuned", "data.n_val=8", "tune.learning_rates.dft.rate=2e-4"])
    assert p.tune.learning_rates["sft"].rate == "tuned" and p.tune.tuned("sft") and not p.tune.tuned("dft")
    assert p.tune.learning_rates["dft"].rate == 2e-4, "YAML's 2e-4 (a string to YAML 1.1) is the number"
    with pytest.raises(ConfigError, match=r"tune.learning_rates.sft.rate: expected float, got 'fast' or must be one of \['tuned'\]"):
        load_params(ROOT / "params.yaml", ["tune.learning_rates.sft.rate=fast"])
    with pytest.raises(ConfigError, match=r"tune.learning_rates.sft: learning rate must be > 0"):
        load_params(ROOT / "params.yaml", ["tune.learning_rates.sft.rate=0"])
    own = load_params(ROOT / "params.yaml", ["tune.learning_rates.dft.grid=[1e-4, 1e-3]"]).tune
    assert own.grid_of("dft") == [1e-4, 1e-3] and own.grid_of("sft") == own.grid, "a method's own grid, else tune.grid"
    with pytest.raises(ConfigError, match=r"tune.learning_rates.dft: a method's grid must be distinct learning rates > 0"):
        load_params(ROOT / "params.yaml", ["tune.learning_rates.dft.grid=[1e-4, 1e-4]"])
    with pytest.raises(ConfigError, match=r"tune.learning_rates.idft.params must be 'train.idft'"):
        load_params(ROOT / "params.yaml", ["tune.learning_rates.idft.params=train.common"])
    with pytest.raises(ConfigError, match=r"set data.n_val > 0"):
        load_params(ROOT / "params.yaml", ["tune.learning_rates.sft.rate=tuned"])
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["tune"]["learning_rates"]["dft"]
    raw["train"]["runs"]["dft-original"] = {"params": "train.common", "data": "artifacts/data/train.jsonl",
                                            "rate_file": "artifacts/tune/dft/best.json"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(info.value) and "tune.learning_rates.dft: missing (train.runs has dft-original)" in str(info.value)
    del raw["train"]["runs"]["dft-original"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "dft" not in load_params(tmp_path / "params.yaml").tune.learning_rates, "a method no run uses needs no entry"
    raw["train"]["runs"]["sft-original"]["rate_file"] = "artifacts/tune/dft/best.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.runs.sft-original.rate_file must be 'artifacts/tune/sft/best.json'"):
        load_params(tmp_path / "params.yaml")


def test_the_study_preset_tunes_every_method_it_trains_over_a_wide_grid(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    p = apply_preset("study", params, ROOT / "presets")
    assert all(p.tune.tuned(m) for m in ("sft", "dft", "idft", "dpo", "simpo"))
    assert {run.split("-")[0] for run in p.train.runs} <= {m for m in p.tune.learning_rates if p.tune.tuned(m)}
    sft = p.tune.grid_of("sft")
    assert all(max(p.tune.grid_of(m)) >= 30 * sorted(sft)[1] for m in ("dft", "idft")), "DFT/IDFT reach 30x SFT's rates"
    assert min(sft) <= 1e-6 and min(p.tune.grid_of("dpo")) <= 1e-6, "below the second study's best rates (1e-5)"
    assert p.data.n_val > 0 and not hasattr(p.train.common, "learning_rate"), "one definition of each rate"
    hinted = [r for r in p.train.runs if r.startswith("idft-hinted")]
    assert hinted and p.tune.tuned("idft-hinted"), "Hinted Decoding data tunes its own rate"
    assert p.tune.learning_rates["idft-hinted"].data == "artifacts/realign/hinted/train.jsonl"
    assert {p.train.runs[r].rate_file for r in hinted} == {"artifacts/tune/idft-hinted/best.json"}
    assert p.train.runs["idft-original"].rate_file == "artifacts/tune/idft/best.json"


def test_a_rate_entry_per_method_and_training_set(tmp_path):
    """'idft' is the rate of every IDFT run; 'idft-hinted' (if present) that of the runs on Hinted
    Decoding data, tuned on that data; entries and runs spell their files out, checked one line each."""
    from onpolicy_core.plumbing.config import parse_tune_key

    assert parse_tune_key("idft") == ("idft", "original") and parse_tune_key("idft-hinted") == ("idft", "hinted")
    for bad in ("idft-hinted-s1", "adam", "idft-web"):
        with pytest.raises(ConfigError, match=f"{bad}"):
            parse_tune_key(bad)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["runs"]["idft-hinted"] = {"params": "train.idft", "data": "artifacts/realign/hinted/train.jsonl",
                                           "rate_file": "artifacts/tune/idft/best.json"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_params(tmp_path / "params.yaml").tune.key_of("idft-hinted") == "idft", "no entry of its own: the method's"
    raw["tune"]["learning_rates"]["idft-hinted"] = {"rate": 3e-4, "params": "train.idft", "grid": None,
                                                    "data": "artifacts/realign/hinted/train.jsonl"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.runs.idft-hinted.rate_file must be 'artifacts/tune/idft-hinted/best.json'"):
        load_params(tmp_path / "params.yaml")
    raw["train"]["runs"]["idft-hinted"]["rate_file"] = "artifacts/tune/idft-hinted/best.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml")
    assert p.tune.key_of("idft-hinted") == "idft-hinted" and p.tune.key_of("idft-original") == "idft"
    raw["tune"]["learning_rates"]["idft-hinted"]["data"] = "artifacts/data/train.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"tune.learning_rates.idft-hinted.data must be 'artifacts/realign/hinted/train.jsonl'"):
        load_params(tmp_path / "params.yaml")
