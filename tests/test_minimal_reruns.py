"""A change reruns exactly the stages that read it, on the real DVC graph.

Every output of a throwaway copy of the project is recorded by `dvc commit` (the graph is what is
tested, not the stages' work), then one setting changes: the stages `dvc status` calls changed, plus
everything downstream of them in `dvc dag`, must be exactly the stages that read the setting."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from onpolicy_core.plumbing.config import set_dotted
from tests.conftest import BIN, bin_env

pytestmark = pytest.mark.service


def _dvc(project, *args) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=bin_env())
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _record_every_output(project) -> None:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        outs = [out.fs_path for stage in repo.index.stages for out in stage.outs]
    for path in map(__import__("pathlib").Path, outs):
        if path.name == "model":  # folders: the base model and each trained model
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"placeholder for {path.name}\n")
    _dvc(project, "commit", "-f", "-q")
    assert json.loads(_dvc(project, "status", "--json")) == {}, "every stage up to date after the commit"


def _will_rerun(project) -> set[str]:
    """The stages `dvc repro` would run: the changed ones and everything downstream of them."""
    changed = set(json.loads(_dvc(project, "status", "--json")))
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', _dvc(project, "dag", "--dot"))
    todo, rerun = list(changed), set(changed)
    while todo:
        stage = todo.pop()
        for upstream, downstream in edges:
            if upstream == stage and downstream not in rerun:
                rerun.add(downstream)
                todo.append(downstream)
    return rerun


def _set(project, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_dotted(params, dotted, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


CHANGES = {
    # IDFT's own setting: its tune stage (trials train as the runs do), its runs and what reads their models.
    "train.idft.beta": (0.5, {"tune@idft", "train@idft-original", "train@idft-hinted", "eval@idft-original", "eval@idft-hinted",
                              "general@idft-original", "general@idft-hinted", "report"}),
    "realign.mixing.hinted.beta": (0.9, {"realign@hinted", "score@hinted", "train@idft-hinted", "eval@idft-hinted",
                                         "general@idft-hinted", "report"}),
    # One method's learning rate: its tune stage, its train runs and what reads them (no other method's).
    "tune.learning_rates.idft.rate": (3.0e-4, {"tune@idft", "train@idft-original", "train@idft-hinted", "eval@idft-original",
                                              "eval@idft-hinted", "general@idft-original", "general@idft-hinted", "report"}),
    # train.common is read by every tune stage (trials train as the runs do) and every run.
    "train.common.batch_size": (2, {f"tune@{m}" for m in ("sft", "dft", "idft", "eaft", "eaft_full", "dpo", "simpo")}
                                | {f"{s}@{r}" for s in ("train", "eval", "general") for r in ("sft-original", "idft-original", "idft-hinted")} | {"report"}),
    # General-ability settings reach the general stages only (and the report that reads them).
    "general.limit": (8, {"general-base", "general@sft-original", "general@idft-original", "general@idft-hinted", "report"}),
    "eval.limit": (8, {"eval-base", "eval@sft-original", "eval@idft-original", "eval@idft-hinted", "report"}),
    "score.thresholds": ([-2.0], {"score@original", "score@self_distill", "score@hinted", "report"}),
    # How many shards run changes no byte (docs/scale.md), so nothing reruns.
    "realign.workers": (4, set()),
    "eval.workers": (2, set()),
}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_change_reruns_exactly_the_stages_that_read_it(project, key):
    _record_every_output(project)
    value, expected = CHANGES[key]
    _set(project, key, value)
    assert _will_rerun(project) == expected
