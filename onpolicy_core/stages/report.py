"""Stage `report`: one comparison of every evaluated model of the pipeline ("did it help?"), with its
uncertainty.

Reads, for the base model and each training run, `<paths.eval>/<model>/records.parquet` (every graded
response) and `summary.json`; the DDT summary of each training set (`<paths.score>/<data>/summary.json`)
and the realignment summary of each variant (`<paths.realign>/<variant>/summary.json`), and the
learning rate the tune stage chose for each method (`<paths.tune>/<method>/best.json`). Writes:

- report.md: per benchmark, every model (runs of one method and data under several seeds as one row,
  mean +- sd over seeds) with n, the headline accuracy and the strict (\\boxed{}-only) accuracy with
  95% intervals, the truncation rate, and paired comparisons on the same problems with the base
  model, the SFT reference and (for a run on realigned data) its method on the original data
  (p-values raw and Holm-adjusted); a verdict that says "no significant difference" where the data
  cannot separate two methods; flags for models that learnt to not stop, and for tuned rates at an
  end of their grid or no better than the start policy; the realignment rejections; the DDT
  statistics of all three training sets beside the paper's reference values.
- comparison.png (bars with 95% intervals, or +- sd over seeds) and comparison.json (every number).

The statistics are `onpolicy_core.algorithms.statistics` (scipy / statsmodels).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np

from onpolicy_core.algorithms.evaluation import pass_at_k
from onpolicy_core.algorithms.statistics import (
    Comparison,
    Estimate,
    bootstrap_mean,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    t_interval,
    wilson,
)
from onpolicy_core.data.io import InputError, atomic_path, write_json, write_text
from onpolicy_core.plumbing.config import (
    BASE,
    EvalConfig,
    GeneralConfig,
    PathsConfig,
    RealignVariant,
    ReportConfig,
    TrackingConfig,
    TrainData,
    parse_run,
    rate_file,
    run_group,
    to_dict,
)
from onpolicy_core.plumbing.tracking import log_artifacts_to, log_metrics_to, stage_run
from onpolicy_core.stages.skeleton import write_run_record

log = logging.getLogger(__name__)

ALPHA = 0.05
TRUNCATION_FLAG = 0.20
"""A trained model whose truncated_rate exceeds the base model's by more than this is flagged."""
SMOKE_SCALE = 100
"""Below this many problems per benchmark the report says it is smoke-scale."""
PAPER_AVG_PHI = {"original": "< -0.1 (ground truth)", "self_distill": "< -0.1", "hinted": "about -0.05"}
"""The paper's avg-phi of each kind of training data (Sec. 3-4), for side-by-side reading."""


def metric_key(cfg: ReportConfig, samples: int) -> str:
    """The per-benchmark key of the headline metric (in each eval summary.json)."""
    return {"greedy": "greedy_accuracy", "avg@k": "avg_at_k", "pass@k": f"pass_at_{samples}"}[cfg.metric]


COMPARISON_VIEW = "onpolicy-comparison"
"""The MLflow runs-table view the report shares: every model's eval run, the same metric columns."""


def comparison_view(benchmarks: list[str], key: str) -> dict:
    """The shared view (MLflow's view-state fields): eval runs only, by run name (eval-base, eval-<method>-<data>),
    with the model's tags and, per benchmark, the headline and strict accuracy and the truncation rate as
    columns. Ordered by name, not by date: MLflow's table nests child runs under their (collapsed) parents
    only when ordered by date, and a trained model's eval run is a child of its training run."""
    strict = "strict_avg_at_k" if key != "greedy_accuracy" else "strict_greedy_accuracy"
    metrics = [f"{b}/{m}" for b in benchmarks for m in (key, strict, "truncated_rate")]
    return {"searchFilter": "tags.`onpolicy.stage` = 'eval'", "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [f"tags.`onpolicy.{t}`" for t in ("model", "method", "data")] + [f"metrics.`{m}`" for m in metrics],
            "runsHiddenMode": "SHOW_ALL", "viewMaximized": False, "runListHidden": False}


def per_problem(records: list[dict], metric: str, samples: int, strict: bool = False) -> dict[str, dict[str, float]]:
    """{benchmark: {problem_id: value}} of the headline metric: greedy correctness (0/1), the share of
    correct samples (Avg@k) or the unbiased pass@k estimate, from every graded response."""
    column = "strict_correct" if strict else "correct"
    mode = "greedy" if metric == "greedy" else "sample"
    cells: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        if r["mode"] == mode:
            cells.setdefault(r["benchmark"], {}).setdefault(r["problem_id"], []).append(bool(r.get(column, False)))
    out: dict[str, dict[str, float]] = {}
    for bench, problems in cells.items():
        if metric == "pass@k":
            out[bench] = {pid: pass_at_k(len(v), sum(v), samples) for pid, v in problems.items()}
        else:
            out[bench] = {pid: sum(v) / len(v) for pid, v in problems.items()}
    return out


@dataclass
class Group:
    """One method x data (or the base model): its runs (one per seed) and their per-problem values."""

    name: str
    runs: list[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """run -> benchmark -> problem -> headline value."""
    strict: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """The same, strictly graded."""
    responses: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    """run -> benchmark -> problem -> greedy response text (empty where the records hold none)."""

    def covers(self, bench: str) -> bool:
        """Every run of the group was evaluated on `bench`."""
        return all(bench in self.values[r] for r in self.runs)


def greedy_responses(records: list[dict]) -> dict[str, dict[str, str]]:
    """{benchmark: {problem_id: text}} of the greedy responses."""
    out: dict[str, dict[str, str]] = {}
    for r in records:
        if r["mode"] == "greedy" and r.get("response") is not None:
            out.setdefault(r["benchmark"], {})[r["problem_id"]] = r["response"]
    return out


SAME_ANSWERS_FLAG = 0.75
"""A trained model that gives more than three quarters of the base model's greedy answers word for word
is flagged: at its learning rate it has barely moved, so its row is mostly the start policy under
another name (the column shows every model's share)."""


def same_answers_as_base(groups: list[Group]) -> dict[str, dict[str, float]]:
    """{group: {benchmark: share of its greedy answers that are the base model's text word for word, over
    its seeds' problems; "all": the same over every benchmark}}. Accuracy alone cannot say this: two
    models can score alike with different answers."""
    base = next(g for g in groups if g.name == BASE).responses.get(BASE, {})
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        if g.name == BASE:
            continue
        same = total = 0
        for bench, answers in base.items():
            pairs = [(answers[pid], g.responses[run][bench][pid]) for run in g.runs
                     for pid in answers if pid in g.responses.get(run, {}).get(bench, {})]
            if pairs:
                alike = sum(a == b for a, b in pairs)
                out.setdefault(g.name, {})[bench] = alike / len(pairs)
                same, total = same + alike, total + len(pairs)
        if total:
            out[g.name]["all"] = same / total
    return out


def same_answer_flags(same: dict[str, dict[str, float]]) -> list[str]:
    return [f"{group}: {_pct(shares['all'])}% of its greedy answers are the base model's text word for word: at its "
            "learning rate it has barely moved from the start policy, so read its row as the start policy's."
            for group, shares in same.items() if shares["all"] > SAME_ANSWERS_FLAG]


def group_runs(runs: list[str]) -> dict[str, list[str]]:
    """Runs by '<method>-<data>' (seeds of one combination together), base first, order kept."""
    groups: dict[str, list[str]] = {BASE: [BASE]}
    for run in runs:
        groups.setdefault(run_group(run), []).append(run)
    return groups


def _matrix(group: Group, bench: str, ids: list[str], strict: bool = False) -> np.ndarray:
    """[seeds, problems] of a group's values on the given problems (NaN where a run lacks one)."""
    source = group.strict if strict else group.values
    return np.array([[source[run].get(bench, {}).get(pid, np.nan) for pid in ids] for run in group.runs], dtype=float)


def estimate(group: Group, bench: str, ids: list[str], metric: str, strict: bool = False) -> dict:
    """Value, 95% interval and n of a group; with several seeds also the per-seed values and their sd."""
    m = _matrix(group, bench, ids, strict)
    per_seed = np.nanmean(m, axis=1)
    per_problem_mean = np.nanmean(m, axis=0)
    if metric == "greedy" and m.shape[0] == 1:
        e: Estimate = wilson(int(np.nansum(m[0])), len(ids))
        method = "Wilson"
    else:
        e = bootstrap_mean(per_problem_mean)
        method = "bootstrap over problems"
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "interval": method, "seeds": m.shape[0],
            "per_seed": per_seed.tolist(), "sd": float(np.std(per_seed, ddof=1)) if m.shape[0] > 1 else None}


def compare(a: Group, b: Group, bench: str, ids: list[str], metric: str) -> Comparison:
    """A minus B on the same problems: exact McNemar for one-seed greedy runs, else paired bootstrap
    on the per-problem values averaged over seeds."""
    ma, mb = _matrix(a, bench, ids), _matrix(b, bench, ids)
    if metric == "greedy" and ma.shape[0] == 1 and mb.shape[0] == 1:
        return mcnemar_exact(ma[0] > 0.5, mb[0] > 0.5)
    return paired_bootstrap(np.nanmean(ma, axis=0), np.nanmean(mb, axis=0))


def _comparison_dict(c: Comparison | None) -> dict | None:
    if c is None:
        return None
    return {"diff": c.diff, "low": c.low, "high": c.high, "p_value": c.p_value, "n": c.n, "test": c.test}


def original_of(group: str, names) -> str | None:
    """The group of the same method on the original data, for a group trained on other data ('idft-hinted'
    -> 'idft-original'), when `names` has it: the paper's data-level claim is this pair (same loss, same
    seeds, only the training text differs)."""
    if group == BASE:
        return None
    method, data = parse_run(group)
    other = f"{method}-original"
    return other if data != "original" and other in names else None


def build_table(groups: list[Group], benches: list[str], metric: str, sft_reference: str) -> dict:
    """Per benchmark and group: estimates (headline and strict) and comparisons with base, with SFT and,
    for a group on realigned data, with its method on the original data; Holm-adjusted p-values within
    each benchmark and reference."""
    by_name = {g.name: g for g in groups}
    sft = run_group(sft_reference) if sft_reference else None
    table: dict[str, dict[str, dict]] = {}
    for bench in benches:
        ids = sorted(by_name[BASE].values[BASE].get(bench, {}))
        table[bench] = {}
        for g in groups:
            if not g.covers(bench):
                continue
            cell = {"estimate": estimate(g, bench, ids, metric), "strict": estimate(g, bench, ids, metric, strict=True),
                    "vs_base": None, "vs_sft": None, "vs_original": None}
            if g.name != BASE:
                cell["vs_base"] = _comparison_dict(compare(g, by_name[BASE], bench, ids, metric))
            if sft in by_name and g.name not in (BASE, sft):
                cell["vs_sft"] = _comparison_dict(compare(g, by_name[sft], bench, ids, metric))
            original = original_of(g.name, by_name)
            if original and by_name[original].covers(bench):
                cell["vs_original"] = _comparison_dict(compare(g, by_name[original], bench, ids, metric))
            table[bench][g.name] = cell
        for ref in ("vs_base", "vs_sft", "vs_original"):
            cells = [c[ref] for c in table[bench].values() if c[ref] is not None]
            for c, adjusted in zip(cells, holm([c["p_value"] for c in cells])):
                c["p_holm"] = adjusted
    return table


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _estimate_text(e: dict) -> str:
    if e["seeds"] > 1:
        return f"{_pct(e['value'])} ± {_pct(e['sd'])} sd [{_pct(e['low'])}, {_pct(e['high'])}]"
    return f"{_pct(e['value'])} [{_pct(e['low'])}, {_pct(e['high'])}]"


def _comparison_text(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{_pct(c['diff'], True)} [{_pct(c['low'], True)}, {_pct(c['high'], True)}], p {_p(c['p_value'])} (Holm {_p(c.get('p_holm'))})"


def _significance(c: dict) -> str:
    p = c.get("p_holm", c["p_value"])
    if p is None or math.isnan(p) or p >= ALPHA:
        return "no significant difference"
    return "significantly higher" if c["diff"] > 0 else "significantly lower"


def verdict(table: dict, sft_reference: str) -> list[str]:
    """Plain sentences: the best model per benchmark, and each method against SFT and base (and a method
    on realigned data against the same method on the original data), saying 'no significant difference'
    where the paired test cannot separate them (Holm-adjusted, alpha 0.05)."""
    sft = run_group(sft_reference) if sft_reference else None
    lines = []
    for bench, cells in table.items():
        best = max(cells, key=lambda g: cells[g]["estimate"]["value"])
        lines.append(f"- **{bench}**: highest point estimate {best} ({_estimate_text(cells[best]['estimate'])}).")
        for name, cell in cells.items():
            for ref, ref_name in (("vs_sft", sft), ("vs_base", BASE), ("vs_original", original_of(name, cells))):
                c = cell[ref]
                if c is not None:
                    same_method = " (same method, original data)" if ref == "vs_original" else ""
                    lines.append(f"  - {name} vs {ref_name}{same_method}: {_pct(c['diff'], True)} points, {_significance(c)} "
                                 f"(p {_p(c['p_value'])}, Holm {_p(c.get('p_holm'))}, n = {c['n']}).")
        separated = [n for n, c in cells.items() if c["vs_sft"] is not None and _significance(c["vs_sft"]) != "no significant difference"]
        if sft in cells and not separated:
            lines.append(f"  - No method differs significantly from {sft} on {bench} at n = {cells[sft]['estimate']['n']}.")
    return lines


def truncation_flags(results: dict[str, dict], runs: list[str]) -> list[str]:
    """Trained models whose truncated_rate exceeds the base model's by more than TRUNCATION_FLAG."""
    flags = []
    for run in runs:
        for bench, m in results.get(run, {}).items():
            base = results.get(BASE, {}).get(bench, {}).get("truncated_rate")
            if base is not None and m.get("truncated_rate") is not None and m["truncated_rate"] - base > TRUNCATION_FLAG:
                flags.append(f"{run} on {bench}: truncated_rate {_pct(m['truncated_rate'])}% vs base {_pct(base)}% "
                             f"(+{_pct(m['truncated_rate'] - base)} points): it has learnt to not stop.")
    return flags


def ddt_statistics(paths: PathsConfig) -> dict[str, dict]:
    """avg-phi of every training set (original, self-distilled, hinted) with n, sd and a 95% t-interval."""
    out = {}
    for data in get_args(TrainData):
        summary = Path(paths.score) / data / "summary.json"
        if not summary.exists():
            log.warning("no DDT summary for training set %r at %s; the report omits it", data, summary)
            continue
        s = json.loads(summary.read_text())
        if "avg_phi" not in s:
            continue
        n = s.get("scored_examples", s["examples"])
        sd = s["avg_phi"]["std"] * math.sqrt(n / (n - 1)) if n > 1 else float("nan")  # summary std is the population sd
        low, high = t_interval(s["avg_phi"]["mean"], sd, n)
        out[data] = {"examples": n, "avg_phi_mean": s["avg_phi"]["mean"], "avg_phi_sd": sd, "low": low, "high": high,
                     "frac_phi_gt_-1": s["token_phi"].get("frac_phi_gt_-1"), "paper": PAPER_AVG_PHI[data]}
    return out


def realign_statistics(paths: PathsConfig) -> dict[str, dict]:
    out = {}
    for variant in get_args(RealignVariant):
        summary = Path(paths.realign) / variant / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            n = s["examples"]
            verified = round((s.get("verified_rate") or 0.0) * n)
            ci = wilson(verified, n)
            out[variant] = {"examples": n, "verified": verified, "verified_ci": [ci.low, ci.high],
                            "eos_rate": s.get("eos_rate"), "rejections": s.get("rejections", {}), "mean_tokens": s.get("mean_tokens")}
    return out


FALLBACK_FLAG = 0.5
"""A realigned training set with more than this share of original solutions (fallbacks) is flagged."""


NEAR_SAME_FLAG = 0.9
"""Two training sets that share more than this share of their examples word for word are flagged:
runs on them differ only by the rest (at CPU scale Hinted Decoding can mix so little that its rewrites
are the self-distilled ones)."""


def _content_digest(path: Path) -> tuple[str, int, int, set[str]]:
    """(digest of the (question, solution) pairs trained on, examples, fallbacks, each pair's digest)
    of a training file: two files with one digest train the same model, whatever else their records carry."""
    import hashlib

    from onpolicy_core.data.io import read_jsonl

    rows = read_jsonl(path)
    digest, pairs = hashlib.sha256(), set()
    for r in rows:
        line = json.dumps([r["question"], r["solution"]], ensure_ascii=False).encode() + b"\n"
        digest.update(line)
        pairs.add(hashlib.sha256(line).hexdigest())
    return digest.hexdigest(), len(rows), sum(r.get("realign_outcome") == "fallback_original" for r in rows), pairs


def training_sets(paths: PathsConfig) -> dict[str, dict]:
    """Per training set (original, self_distill, hinted) that exists: examples, how many are the
    original solution (fallbacks of unverified rewrites), a digest of what is trained on, and the share
    of its examples each earlier set has word for word (`shared_with`)."""
    from onpolicy_core.plumbing.config import training_file

    out, pairs = {}, {}
    for data in get_args(TrainData):
        path = Path(training_file(paths, data))
        if path.is_file():
            digest, n, fallbacks, pairs[data] = _content_digest(path)
            out[data] = {"examples": n, "fallbacks": fallbacks, "fallback_share": fallbacks / n if n else None, "digest": digest,
                         "shared_with": {other: len(pairs[data] & pairs[other]) / max(n, out[other]["examples"], 1) for other in out}}
    return out


def same_data(runs: list[str], sets: dict[str, dict]) -> dict[str, str]:
    """{group: the group it duplicates}: a method's run on a training set whose content is identical to
    another set's (every rewrite fell back) is the same model under another name, not a result."""
    first: dict[tuple[str, str], str] = {}
    aliases = {}
    for group in dict.fromkeys(run_group(r) for r in runs):
        method, data = parse_run(group)
        if data not in sets:
            continue
        key = (method, sets[data]["digest"])
        if key in first:
            aliases[group] = first[key]
        else:
            first[key] = group
    return aliases


def data_flags(sets: dict[str, dict], aliases: dict[str, str]) -> list[str]:
    flags = []
    for data, s in sets.items():
        if data != "original" and s["fallback_share"] is not None and s["fallback_share"] > FALLBACK_FLAG:
            flags.append(f"{data}: {_pct(s['fallback_share'])}% of its {s['examples']} training examples are the original solution "
                         "(unverified rewrites fell back): it is mostly the original data.")
    for data, s in sets.items():
        for other, share in s.get("shared_with", {}).items():
            # Against the original set the fallback flag above already speaks.
            if other != "original" and share > NEAR_SAME_FLAG and s["digest"] != sets[other]["digest"]:
                flags.append(f"{other} and {data}: {_pct(share)}% of their training examples are the same text word for word, "
                             "so runs on them differ only by the rest: read their rows as nearly one result.")
    for group, twin in aliases.items():
        flags.append(f"{group} trained on exactly the data of {twin}: it is the same model, so it is not reported as a separate result.")
    return flags


def policy_statistics(paths: PathsConfig) -> dict | None:
    """The prime stage's raw-vs-primed check (None when that stage has not run here)."""
    summary = Path(paths.prime) / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def cost_table(paths: PathsConfig, runs: list[str], rate_files: dict[str, str] | None = None) -> dict[str, dict]:
    """Per <method>-<data>: data preparation (the realign stage of its training set; pair sampling is
    part of DPO/SimPO training) and training, in wall and CPU seconds, the mean over its seeds, from the
    stages' run records (artifacts/.runs; they differ between two runs of the same inputs); and the wall
    seconds of the learning-rate search its runs read (the sum of its trials.json; None for a rate fixed
    by hand), which runs of one tune entry share."""
    from onpolicy_core.stages.skeleton import read_run_record

    def cost(record: dict) -> tuple[float | None, float | None]:
        shards = record.get("shards") or {}
        wall = record.get("process_seconds")
        cpu = record.get("cpu_seconds")
        if cpu is not None:
            cpu += sum(s.get("cpu_seconds", 0.0) for s in shards.values())
        return wall, cpu

    table: dict[str, dict] = {}
    for group, members in group_runs(runs).items():
        if group == BASE:
            continue
        _, data = parse_run(group)
        prep = cost(read_run_record(Path(paths.realign) / data)) if data != "original" else (0.0, 0.0)
        trains = [cost(read_run_record(Path(paths.train) / run)) for run in members]
        if any(v is None for t in trains for v in t):
            continue
        trials = Path(_rate_file_of(paths, members[0], rate_files)).parent / "trials.json"
        search = json.loads(trials.read_text()) if trials.is_file() else []
        table[group] = {"data_wall_s": prep[0], "data_cpu_s": prep[1], "train_wall_s": float(np.mean([t[0] for t in trains])),
                        "train_cpu_s": float(np.mean([t[1] for t in trains])), "seeds": len(members),
                        "tune_wall_s": sum(t["seconds"] for t in search) if search else None, "tune_trials": len(search)}
    return table


def problems_note(eval_cfg: EvalConfig) -> str:
    """Which problems each benchmark was evaluated on (eval.limit, eval.limit_order)."""
    if eval_cfg.limit is None:
        return "Problems: every problem of each benchmark."
    how = "the first in file order" if eval_cfg.limit_order == "first" else f"a random sample (seed {eval_cfg.seed}) kept in file order"
    return f"Problems: at most {eval_cfg.limit} per benchmark, {how} (`eval.limit`, `eval.limit_order`)."


def policy_section(policy: dict | None) -> list[str]:
    """The starting policy: the raw and the primed model on held-out primer problems."""
    if not policy:
        return []
    if not policy.get("enabled"):
        return ["## Starting policy", "", f"Not primed (`model.prime.enabled: {policy.get('setting')}`, source "
                f"`{policy.get('source')}`): every stage starts from the model as loaded.", ""]
    lines = ["## Starting policy (primed)", "",
             (f"Every stage (realign, score, train, eval as `base`) starts from the model after a short SFT on "
              f"{policy['primer_examples']} primer problems disjoint from every data split ({policy['overlap_dropped']} "
              f"overlapping questions dropped); compared greedily on {policy['check_examples']} held-out primer problems:"), "",
             "| model | accuracy [95% CI] | strict [95% CI] | truncated | mean tokens |", "|---|---|---|---|---|"]
    for which in ("raw", "primed"):
        m = policy[which]
        a, st = m["accuracy"], m["strict_accuracy"]
        lines.append(f"| {which} | {_pct(a['value'])} [{_pct(a['low'])}, {_pct(a['high'])}] | {_pct(st['value'])} "
                     f"[{_pct(st['low'])}, {_pct(st['high'])}] | {_pct(m['truncated_rate'])}% | {m['mean_tokens']:.0f} |")
    return [*lines, ""]


def cost_section(cost: dict[str, dict], policy: dict | None) -> list[str]:
    """Wall and CPU seconds per method: data preparation and training (the paper's third axis)."""
    if not cost:
        return []

    def s(x: float | None) -> str:
        return "–" if x is None else f"{x:,.0f}"

    lines = ["## Cost per method", "",
             ("Seconds of the stage processes (model loading included), mean over seeds; data preparation is the "
              "Hinted Decoding stage of the training set (DPO and SimPO sample their pairs inside training). "
              "Measured on this run's machine: these figures, unlike every other number here, differ between runs. "
              "Rate search: the wall seconds of every trial of the learning-rate search the runs read, once per "
              "search (– for a rate fixed by hand)."), "",
             "| model | data prep wall s | data prep CPU s | training wall s | training CPU s | total CPU s | rate search wall s (trials) |",
             "|---|---|---|---|---|---|---|"]
    for group, c in cost.items():
        search = "–" if c.get("tune_wall_s") is None else f"{s(c['tune_wall_s'])} ({c['tune_trials']})"
        lines.append(f"| {group} | {s(c['data_wall_s'])} | {s(c['data_cpu_s'])} | {s(c['train_wall_s'])} | {s(c['train_cpu_s'])} | "
                     f"{s(_total(c['data_cpu_s'], c['train_cpu_s']))} | {search} |")
    return [*lines, ""]


def _total(*parts: float | None) -> float | None:
    """Sum of the parts that were measured; None when none was (a missing record is not zero cost)."""
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def render_markdown(table: dict, results: dict, groups: list[Group], ddt: dict, realign: dict, metric: str,
                    sft_reference: str, flags: list[str], problems: str = "", sets: dict | None = None,
                    policy: dict | None = None, cost: dict | None = None, same: dict | None = None) -> str:
    ns = [c["estimate"]["n"] for cells in table.values() for c in cells.values()]
    n_min = min(ns) if ns else 0
    lines = [f"# Comparison: {metric} accuracy (%)", ""]
    if n_min < SMOKE_SCALE:
        widest = wilson(n_min // 2, n_min)  # the interval is widest near 50%
        half = 50 * (widest.high - widest.low)
        lines += [(f"> **Smoke scale.** {n_min} problems per benchmark: one accuracy's 95% interval is up to ±{half:.0f} points "
                   "wide, so these numbers show the pipeline working, not which method wins. The `study` preset is sized to answer that."),
                  ""]
    lines += [*([problems, ""] if problems else []),
        ("Each accuracy: value [95% interval] over n problems (Wilson for one greedy run; bootstrap over problems for Avg@k, "
         "pass@k and means over seeds). *Strict* counts only an answer inside `\\boxed{}`; the headline (lenient) value also "
         "accepts the last number of a response, as Qwen-style evaluation does. Δ: difference on the same problems "
         "[95% paired bootstrap interval], p-value of the paired test (exact McNemar for one greedy run each, else paired "
         "bootstrap), Holm-adjusted within each benchmark and reference. Several seeds of one method: mean ± sd over seeds."),
        "", "## Verdict", "", *verdict(table, sft_reference), ""]
    if flags:
        lines += ["## Warnings", "", *[f"- ⚠ {f}" for f in flags], ""]
    lines += policy_section(policy)
    sft = run_group(sft_reference) if sft_reference else "sft"
    for bench, cells in table.items():
        n = next(iter(cells.values()))["estimate"]["n"]
        lines += [f"## {bench} (n = {n})", "",
                  f"| model | seeds | {metric} [95% CI] | strict [95% CI] | truncated | answers = base's | Δ vs base | Δ vs {sft} | "
                  "Δ vs its method on original data |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, c in cells.items():
            runs = next(g.runs for g in groups if g.name == name)
            trunc = [results[r][bench].get("truncated_rate") for r in runs if bench in results.get(r, {})]
            trunc_text = _pct(float(np.mean(trunc))) + "%" if trunc and None not in trunc else "–"
            share = (same or {}).get(name, {}).get(bench)
            lines.append(f"| {name} | {c['estimate']['seeds']} | {_estimate_text(c['estimate'])} | {_estimate_text(c['strict'])} | "
                         f"{trunc_text} | {'–' if share is None else _pct(share) + '%'} | {_comparison_text(c['vs_base'])} | "
                         f"{_comparison_text(c['vs_sft'])} | {_comparison_text(c['vs_original'])} |")
        lines += ["", "*answers = base's*: the share of greedy answers that are the base model's text word for word. "
                  "*Δ vs its method on original data*: a model trained on realigned data against the same method on the "
                  "original solutions, the paper's data-level comparison (the same loss; only the training text differs).", ""]
    lines += ["## Every metric of every run", ""]
    for bench in table:
        keys = sorted({k for m in results.values() for k in m.get(bench, {})})
        lines += [f"### {bench}", "", "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for run, per_bench in results.items():
            m = per_bench.get(bench, {})
            lines.append("| " + run + " | " + " | ".join("–" if m.get(k) is None else f"{m[k]:.4g}" for k in keys) + " |")
        lines.append("")
    if realign:
        lines += ["## Realignment (Hinted Decoding) of the training set", "",
                  "Verified: ended with EOS, answer inside `\\boxed{}` equal to the gold answer (math-verify), no repetition.", "",
                  "| variant | examples | verified [95% CI] | EOS rate | rejected: repetitive | truncated | no boxed answer | "
                  "wrong answer | second answer | wrong step | training set: original solutions |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for variant, s in realign.items():
            r, n = s["rejections"], s["examples"]
            fallback = (sets or {}).get(variant, {}).get("fallback_share")
            lines.append(f"| {variant} | {n} | {_pct(s['verified'] / n if n else None)} [{_pct(s['verified_ci'][0])}, "
                         f"{_pct(s['verified_ci'][1])}] | {_pct(s['eos_rate'])}% | {r.get('repetitive', 0)} | {r.get('truncated', 0)} | "
                         f"{r.get('no_boxed_answer', 0)} | {r.get('wrong_answer', 0)} | {r.get('second_answer', 0)} | "
                         f"{r.get('wrong_step', 0)} | {_pct(fallback)}% |")
        lines.append("")
    lines += cost_section(cost or {}, policy)
    if ddt:
        lines += ["## DDT statistics of the training sets", "",
                  ("avg φ: per example, the mean over its tokens of φ = log p + H under the base model (0 = what the model "
                   "itself would write). The paper reports ground-truth and self-distilled data below -0.1 and Hinted "
                   "Decoding near -0.05."), "",
                  "| data | n | avg φ mean [95% CI] | sd | share of tokens φ > -1 | paper |", "|---|---|---|---|---|---|"]
        for data, s in ddt.items():
            lines.append(f"| {data} | {s['examples']} | {s['avg_phi_mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | "
                         f"{s['avg_phi_sd']:.3f} | {_pct(s['frac_phi_gt_-1'])}% | {s['paper']} |")
    return "\n".join(lines) + "\n"


def plot_comparison(table: dict, metric: str, path: Path) -> None:
    """Grouped bars per benchmark with 95% intervals (one run) or +- sd over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(table)
    models = list(dict.fromkeys(m for cells in table.values() for m in cells))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(models) / 3)), 4.2))
    x = np.arange(len(benches))
    for i, model in enumerate(models):
        values, errors = [], [[], []]
        for b in benches:
            e = table[b].get(model, {}).get("estimate")
            v = 100 * e["value"] if e else 0.0
            if e and e["seeds"] > 1:
                lo = hi = 100 * e["sd"]
            elif e:  # Wilson's ends never cross the value (statistics.wilson)
                lo, hi = v - 100 * e["low"], 100 * e["high"] - v
            else:
                lo = hi = 0.0
            values.append(v)
            errors[0].append(lo)
            errors[1].append(hi)
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=model)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(x, benches)
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(f"{metric} by benchmark and model (error bars: 95% interval; ± sd over seeds)", fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(models), 3))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --- Learning rates: what the tune stage chose for each method (a section of its own) ---------------

def _rate_file_of(paths: PathsConfig, run: str, rate_files: dict[str, str] | None) -> str:
    """The best.json a run reads: its `rate_file` in train.runs, else its method's."""
    return (rate_files or {}).get(run) or rate_file(paths, parse_run(run)[0])


def learning_rates(paths: PathsConfig, runs: list[str], rate_files: dict[str, str] | None = None) -> dict[str, dict | None]:
    """Per tune entry the runs read (their `rate_file` in train.runs; without it, each run's method's),
    the tune stage's best.json (None when there is none)."""
    files = {run: _rate_file_of(paths, run, rate_files) for run in runs}
    out: dict[str, dict | None] = {}
    for path in dict.fromkeys(Path(f) for f in files.values()):
        out[path.parent.name] = json.loads(path.read_text()) if path.is_file() else None
    return out


def rate_flags(rates: dict[str, dict | None]) -> list[str]:
    """Warnings on tuned rates a reader should not take at face value: a rate at the end of its grid (the
    best may lie beyond it; a grid search cannot say), and a best trial no better than the start policy
    on validation (within the tuning budget, no rate helped, so the method's rows show an untrained model)."""
    flags = []
    for method, best in rates.items():
        if not best or best.get("source") != "tuned" or len(best.get("grid") or ()) < 2:
            continue
        rate, grid = best["learning_rate"], sorted(best["grid"])
        if rate in (grid[0], grid[-1]):
            end, beyond = ("lowest", "below") if rate == grid[0] else ("highest", "above")
            flags.append(f"{method}: the chosen learning rate {rate:g} is the {end} point of its grid, so the best rate may lie "
                         f"{beyond} it: extend the grid (tune.grid, or the method's own) and tune again.")
        o, start = best.get("objective"), best.get("start_policy")
        if o and start and o["value"] <= start["value"]:
            flags.append(f"{method}: no learning rate of its grid beat the start policy on validation ({_pct(o['value'])}% vs "
                         f"{_pct(start['value'])}%, n = {o['n']}): within the tuning budget, training did not help, so its "
                         "rows show a model that has barely left the start policy.")
    return flags


def learning_rate_section(rates: dict[str, dict | None]) -> list[str]:
    """The 'Learning rates' section: per method the rate, fixed by hand or tuned, the grid tried, the
    validation accuracy of the best trial and of the start policy, with 95% Wilson intervals."""
    lines = ["## Learning rates", "",
             ("Each method's peak learning rate, as the tune stage chose it: fixed by hand in params.yaml, or tuned "
              "over the grid on the validation split (never on the benchmarks above). The start policy is the model "
              "every trial trained from, scored on the same validation problems."), "",
             "| method | learning rate | source | grid | best trial: validation accuracy [95% CI] | start policy | trials |",
             "|---|---|---|---|---|---|---|"]

    def score(o: dict | None, label: str = "") -> str:
        return f"{_pct(o['value'])} [{_pct(o['low'])}, {_pct(o['high'])}]{label}" if o else "–"

    for method, best in rates.items():
        if best is None:
            lines.append(f"| {method} | – | no best.json (run `onpolicy tune --method {method}`) | – | – | – | – |")
            continue
        grid = ", ".join(f"{r:g}" for r in best["grid"]) if best.get("grid") else "–"
        o = best.get("objective")
        trial = score(o, f" (n = {o['n']}, {best['metric']})" if o else "")
        lines.append(f"| {method} | {best['learning_rate']:g} | {best['source']} | {grid} | {trial} | "
                     f"{score(best.get('start_policy'))} | {best['trials']} |")
    return [*lines, ""]


def _read_records(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=None).to_pylist()
    except Exception as exc:
        raise InputError(f"{path}: not a readable eval records file ({exc.__class__.__name__}: {exc})") from exc


# --- General ability (multiple choice, log-likelihood): the `general` stage's results ------------------


def general_table(paths: PathsConfig, general: GeneralConfig, models: list[str]) -> dict[str, dict[str, dict]]:
    """Per set and model: n, acc and acc_norm with Wilson 95% intervals, the chance rate, and the exact
    McNemar test against the base model on the same questions (Holm-adjusted over the models of a set,
    per metric)."""
    needed = [Path(paths.general) / m / "records.parquet" for m in models]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise InputError(f"no general-ability results for {missing}; run `dvc repro` (or `onpolicy general --model <name>`) first")
    correct: dict[str, dict[str, dict[str, tuple[bool, bool, float]]]] = {}
    for model, path in zip(models, needed):
        for r in _read_records(path):
            correct.setdefault(r["benchmark"], {}).setdefault(model, {})[r["id"]] = (bool(r["correct"]), bool(r["correct_norm"]),
                                                                                    1 / r["n_choices"])
    table: dict[str, dict[str, dict]] = {}
    for bench in general.benchmarks:
        per_model = correct.get(bench, {})
        if BASE not in per_model:
            continue
        table[bench] = {}
        for model in models:
            if model not in per_model:
                continue
            ids = sorted(set(per_model[model]) & set(per_model[BASE]))
            rows, base = [per_model[model][i] for i in ids], [per_model[BASE][i] for i in ids]
            cell: dict = {"n": len(ids), "chance": sum(r[2] for r in rows) / len(rows) if rows else float("nan")}
            for k, metric in enumerate(("acc", "acc_norm")):
                e = wilson(sum(r[k] for r in rows), len(rows))
                cell[metric] = {"value": e.value, "low": e.low, "high": e.high}
                if model != BASE:
                    cell.setdefault("vs_base", {})[metric] = _comparison_dict(mcnemar_exact([r[k] for r in rows], [b[k] for b in base]))
            table[bench][model] = cell
        for metric in ("acc", "acc_norm"):
            cells = [c["vs_base"][metric] for c in table[bench].values() if "vs_base" in c]
            for c, adjusted in zip(cells, holm([c["p_value"] for c in cells])):
                c["p_holm"] = adjusted
    return table


def render_general(table: dict[str, dict[str, dict]], general: GeneralConfig) -> str:
    """The report's "General ability" section (empty when nothing was scored)."""
    if not table:
        return ""
    if general.limit is None:
        which = "every question of each set"
    else:
        how = "the first in file order" if general.limit_order == "first" else f"a random sample (seed {general.seed}) kept in file order"
        which = f"at most {general.limit} questions per set, {how} (`general.limit`, `general.limit_order`)"
    lines = ["## General ability (multiple choice, log-likelihood)", "",
             (f"How much general ability each model keeps: {which}, scored as lm-evaluation-harness does (cloze prompt "
              "`Question: …\nAnswer:`, each choice's summed log-probability; acc_norm divides it by the choice's length in "
              "characters). Value [Wilson 95% interval] in %; Δ vs base: on the same questions, p of the exact McNemar test, "
              "Holm-adjusted over the models of a set."), ""]
    for bench, cells in table.items():
        lines += [f"### {bench} (n = {cells[BASE]['n']})", "",
                  "| model | n | acc [95% CI] | acc_norm [95% CI] | chance | acc Δ vs base | acc_norm Δ vs base |",
                  "|---|---|---|---|---|---|---|"]
        for model, c in cells.items():
            vs = c.get("vs_base", {})
            lines.append(f"| {model} | {c['n']} | {_general_estimate(c['acc'])} | {_general_estimate(c['acc_norm'])} | "
                         f"{_pct(c['chance'])} | {_general_comparison(vs.get('acc'))} | {_general_comparison(vs.get('acc_norm'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _general_estimate(e: dict) -> str:
    return f"{_pct(e['value'])} [{_pct(e['low'])}, {_pct(e['high'])}]"


def _general_comparison(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{_pct(c['diff'], True)}, p {_p(c['p_value'])} (Holm {_p(c.get('p_holm'))}): {_significance(c)}"


def run_report(cfg: ReportConfig, paths: PathsConfig, tracking: TrackingConfig, eval_cfg: EvalConfig, runs: list[str],
               general: GeneralConfig | None = None, rate_files: dict[str, str] | None = None) -> dict:
    """Gather the evaluation of base + `runs` into <paths.report>/{report.md, comparison.png, comparison.json};
    with `general` (its benchmarks not empty), also the general-ability section."""
    for run in runs:
        parse_run(run)
    models = [BASE, *runs]
    needed = [Path(paths.eval) / m / f for m in models for f in ("summary.json", "records.parquet")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise InputError(f"no evaluation for {missing}; run `dvc repro` (or `onpolicy eval --model <name>`) first")
    results = {m: json.loads((Path(paths.eval) / m / "summary.json").read_text())["benchmarks"] for m in models}
    sets = training_sets(paths)
    aliases = same_data(runs, sets)
    results = {m: r for m, r in results.items() if m == BASE or run_group(m) not in aliases}
    groups = []
    for name, members in group_runs(runs).items():
        if name in aliases:
            continue
        g = Group(name, members)
        for run in members:
            records = _read_records(Path(paths.eval) / run / "records.parquet")
            g.values[run] = per_problem(records, cfg.metric, eval_cfg.samples)
            g.strict[run] = per_problem(records, cfg.metric, eval_cfg.samples, strict=True)
            g.responses[run] = greedy_responses(records)
        groups.append(g)
    benches = list(results[BASE])
    table = build_table(groups, benches, cfg.metric, cfg.sft_reference)
    ddt, realign = ddt_statistics(paths), realign_statistics(paths)
    same = same_answers_as_base(groups)
    rates = learning_rates(paths, runs, rate_files)
    flags = (truncation_flags(results, runs) + data_flags(sets, aliases) + same_answer_flags(same)
             + rate_flags(rates))
    policy, cost = policy_statistics(paths), cost_table(paths, runs, rate_files)
    shown = [m for m in models if m == BASE or run_group(m) not in aliases]
    general_section = general_table(paths, general, shown) if general is not None and general.benchmarks else None
    out = Path(paths.report)
    config = {"report": to_dict(cfg), "models": models, "metric_key": metric_key(cfg, eval_cfg.samples)}
    inputs = [Path(paths.eval) / m / "records.parquet" for m in models] + [Path(paths.score) / d / "summary.json" for d in ddt]
    with stage_run("report", config, tracking, inputs=inputs) as run:
        write_text(out / "report.md", render_markdown(table, results, groups, ddt, realign, cfg.metric, cfg.sft_reference, flags,
                                                      problems_note(eval_cfg), sets, policy, cost, same)
                   + "\n" + "\n".join(learning_rate_section(rates))
                   + ("\n" + render_general(general_section, general) if general_section else ""))
        plot_comparison(table, cfg.metric, out / "comparison.png")
        comparison_json = {"metric": cfg.metric, "metric_key": config["metric_key"], "alpha": ALPHA, "table": table,
                           "results": results, "ddt": ddt, "realign": realign, "truncation_flags": flags,
                           "training_sets": sets, "same_data": aliases, "same_answers_as_base": same, "policy": policy, "cost": cost, "learning_rates": rates}
        if general_section:
            comparison_json["general"] = general_section
        write_json(out / "comparison.json", comparison_json)
        files = [out / "report.md", out / "comparison.png", out / "comparison.json"]
        for f in files:
            run.log_artifact(f)
        headline = {f"{m}/{b}/{config['metric_key']}": c["estimate"]["value"] for b, cells in table.items()
                    for m, c in cells.items() if not math.isnan(c["estimate"]["value"])}
        run.log_metrics(headline | {f"cost/{g}/{k}": v for g, c in cost.items() for k, v in c.items() if v is not None})
        view = run.share_view(COMPARISON_VIEW, comparison_view(benches, config["metric_key"]))
        if view:
            log.info("MLflow comparison view (every model, the same columns): <MLflow UI>/%s", view)
        if parent := os.environ.get("ONPOLICY_PARENT_RUN_ID"):
            # The pipeline run carries the comparison itself: one row of the runs table, every model.
            log_metrics_to(parent, headline, tracking)
            log_artifacts_to(parent, files, tracking, artifact_path="report")
        write_run_record(out / "report", {"mlflow_run_id": run.run_id, "mlflow_parent_run_id": parent, "mlflow_view": view})
    log.info("report: %d models x %d benchmarks -> %s", len(models), len(benches), out / "report.md")
    return comparison_json
