"""Presets: partial params files in presets/ applied onto params.yaml in one command.

`onpolicy preset gsm8k` deep-merges presets/gsm8k.yaml into params.yaml, keeping params.yaml's
comments and key order (ruamel round-trip), and refuses a result that does not load into the typed
config. params.yaml stays the one place DVC reads settings from; `git diff params.yaml` shows what a
preset changed. A preset lists `train.runs` by name; it replaces the runs of params.yaml, each spelled
out with the params block, training file and learning-rate file DVC needs (`run_spec`). Likewise a
preset gives `tune.learning_rates` as `<key>: <rate> | tuned` (or a mapping with the entry's own `grid`),
key a method or `<method>-<data>`, spelled out with its params block and training file.
"""

from __future__ import annotations

import io
from pathlib import Path

from onpolicy_core.data.io import write_text
from onpolicy_core.plumbing.config import (
    ConfigError,
    Params,
    from_mapping,
    method_params,
    parse_run,
    parse_tune_key,
    rate_file_under,
    training_file_under,
    tune_key_of,
)

PRESETS_DIR = Path("presets")


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def run_spec(run: str, paths: dict, tune_keys) -> dict:
    """The params.yaml entry of a run: its method's params block, its training file and the learning-rate
    file of its tune entry (`<method>-<data>` if `tune_keys` has it, else `<method>`)."""
    method, data = parse_run(run)
    return {"params": method_params(method), "data": training_file_under(paths["data"], paths["realign"], data),
            "rate_file": rate_file_under(paths["tune"], tune_key_of(run, tune_keys))}


def tune_entry(key: str, paths: dict) -> dict:
    """The spelled-out fields of a tune.learning_rates entry: its params block and training file."""
    method, data = parse_tune_key(key)
    return {"params": method_params(method), "data": training_file_under(paths["data"], paths["realign"], data)}


def _merge(target, overlay: dict, where: str = "", paths: dict | None = None, tune_keys=()) -> None:
    for key, value in overlay.items():
        here = f"{where}.{key}" if where else str(key)
        if key not in target:
            raise ConfigError(f"preset key {here!r} is not in params.yaml")
        if here == "train.runs" and isinstance(value, list):
            from ruamel.yaml.comments import CommentedMap

            runs = CommentedMap()
            for run in value:
                runs[run] = CommentedMap(run_spec(run, paths, tune_keys))  # block style: DVC's writer keeps it, never wraps it
            target[key] = runs
        elif here == "tune.learning_rates" and isinstance(value, dict):
            from ruamel.yaml.comments import CommentedMap

            for method, rate in value.items():
                entry = rate if isinstance(rate, dict) else {"rate": rate}
                if method in target[key] and isinstance(target[key][method], dict):
                    target[key][method].update(entry)  # keeps the entry's comment and what the preset leaves out
                else:  # block style: DVC's writer keeps it, never wraps it
                    target[key][method] = CommentedMap({"rate": None, **tune_entry(method, paths), "grid": None} | entry)
        elif isinstance(value, dict) and isinstance(target[key], dict):
            _merge(target[key], value, here, paths, tune_keys)
        else:
            target[key] = value


def _block_lists(node) -> None:
    """Lists in block style and nulls empty: the form `dvc exp run -S` writes params.yaml back in,
    so a later `-S` change stays a one-line diff."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedSeq):
        node.fa.set_block_style()
    if isinstance(node, (CommentedMap, dict)):
        for value in node.values():
            _block_lists(value)
    elif isinstance(node, list):
        for value in node:
            _block_lists(value)


def apply_preset(name: str, params_path: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR) -> Params:
    """Merge presets/<name>.yaml into `params_path` (comments kept); returns the resulting config."""
    from ruamel.yaml import YAML

    preset = presets_dir / f"{name}.yaml"
    if not preset.exists():
        raise ConfigError(f"{preset}: no such preset (available: {available(presets_dir)})")
    yaml = YAML()  # round-trip: keeps comments, order, and number spellings such as 2.0e-05
    yaml.preserve_quotes = True
    doc = yaml.load(params_path.read_text(encoding="utf-8"))
    overlay = yaml.load(preset.read_text(encoding="utf-8")) or {}
    _block_lists(overlay)
    tune_keys = {*doc["tune"]["learning_rates"], *((overlay.get("tune") or {}).get("learning_rates") or {})}
    paths = {**doc["paths"], **(overlay.get("paths") or {})}
    _merge(doc, overlay, paths=paths, tune_keys=tune_keys)
    for run, spec in doc["train"]["runs"].items():  # a preset's own <method>-<data> rate reaches the runs it kept too
        spec["rate_file"] = run_spec(run, paths, tune_keys)["rate_file"]
    buffer = io.StringIO()
    yaml.dump(doc, buffer)
    import yaml as pyyaml

    try:
        config = from_mapping(Params, pyyaml.safe_load(buffer.getvalue()))
    except ConfigError as exc:
        raise ConfigError(f"preset {name!r} gives an invalid params.yaml: {exc}") from exc
    write_text(params_path, buffer.getvalue())
    return config
