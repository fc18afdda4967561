"""The champion/challenger promotion gate.

Two modes (`registry.gate.mode`):

- `head_to_head` (default): the challenger is compared with the champion on the same prompts
  (`orpo.head_to_head`: pairwise-judged outputs, paired MT-Bench scores, paired preference accuracy), each
  difference with a confidence interval (`orpo.stats`). `decide_head_to_head` promotes only when the
  primary metric's interval lies entirely above the margin (default: a 50% head-to-head win rate) and no
  other gated metric is significantly worse; otherwise the champion stays, as "kept" (the evidence is
  against the challenger, or too thin) or "no significant difference". A model identical to the champion
  ties on every prompt, so it is never promoted.
- `threshold`: the older point-estimate rules, `decide`, over two flat metric dicts:
  - MT-Bench:  challenger `mt_bench/score` >= champion's + `min_mt_bench_delta`
  - AlpacaEval: challenger `alpaca_eval2/win_rate` >= champion's - `max_win_rate_drop` (points)
  - preference: challenger `preference/accuracy` >= champion's - `max_preference_accuracy_drop`
  each skipped when either side lacks the metric (unless `require_metrics`); at least one must be compared.
  A judge-based number is compared only with the champion's number of the same protocol (its name's prefix:
  `alpaca_local_judge/win_rate` with `alpaca_local_judge/win_rate`, never with `alpaca_eval2/win_rate`).

With no champion yet (`registry.gate.first_version`): `beat_start_model` (default) compares the first version
with the start model, the model it was trained from, by exactly the same rules, the start model's evaluation
directory (`start_report_dir`: the pipeline's `orchestration.evaluate_base_model`, `orpo gate --start-report`)
standing in for the champion's; without that evaluation the version stays challenger, with a reason saying
what to do. `promote` makes the first version that has the required metrics (when they are required)
champion without any comparison. `promote` (the function) is the MLflow side: it reads both sides'
evaluation files, decides, moves the `champion` alias when the challenger passes (not in a dry run), and
records the decision with its opponent and every difference, interval, n, test and seed on the challenger's
version (tags, description, and a `gate/` folder of its run with decision.json, the annotations and the
chart).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from orpo.head_to_head import (
    MT_BENCH_SCORE,
    PREFERENCE_ACCURACY,
    EvaluationFiles,
    HeadToHead,
    evaluation_files,
    read_evaluation,
)

if TYPE_CHECKING:
    from orpo.config import GateConfig, PipelineConfig
    from orpo.registry import RegisteredVersion

log = logging.getLogger(__name__)

# The threshold rule's AlpacaEval metric: the leaderboard protocol's name (head_to_head's ALPACA_WIN_RATE is a
# chart key for win rates computed from saved annotations, whatever their protocol).
ALPACA_WIN_RATE = "alpaca_eval2/win_rate"
GATED_METRICS = (MT_BENCH_SCORE, ALPACA_WIN_RATE, PREFERENCE_ACCURACY)
# Judge-based metrics are named by the protocol that produced them (evals.protocols: `alpaca_eval2/win_rate`
# official, `alpaca_local_judge/win_rate`, `mt_bench_other_judge/score`, ...). A threshold rule compares a
# number only with the champion's number of the same protocol: (family prefix, metric leaf) per rule.
_PROTOCOL_FAMILIES = {MT_BENCH_SCORE: ("mt_bench", "score"), ALPACA_WIN_RATE: ("alpaca", "win_rate")}

# Scores come back through float parsing and JSON; an exact tie must not fail on a last-bit difference.
_TOLERANCE = 1e-9

# Version tags written by `promote`.
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_AGAINST = "gate.champion_version"
TAG_OPPONENT = "gate.opponent"  # what the challenger was compared with: "champion vN" or "start model <ref>"
TAG_COMPARED = "gate.compared"
TAG_MODE = "gate.mode"
# Run artifact folders: what `orpo.registry.log_evaluation` logs, and what the gate adds.
EVALUATION_ARTIFACT = "evaluation"
GATE_ARTIFACT = "gate"
TAG_DIFFERENCE_PREFIX = "gate.diff."

PROMOTED = "promoted"
KEPT = "kept"
NO_DIFFERENCE = "no significant difference"
START_MODEL = "start model"
# Lineage tags naming the model a version was trained from (orpo.run_identity, orpo.registry), pinned first.
_START_MODEL_TAGS = ("run_inputs.start_model", "base_model")
# MLflow caps tag values (5000 characters on some stores); JSON past this is cut down, never truncated.
_MAX_TAG = 4000
_MAX_DESCRIPTION = 5000  # the model_versions.description column of MLflow's SQL stores


@dataclass(frozen=True)
class GateDecision:
    """The outcome of one gate: promoted or not, why, and every number that was compared."""

    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    # threshold: metric -> {"challenger": x, "champion": y, "delta": x - y, "rule": "...", "passed": bool}
    # head_to_head: metric -> Difference.as_dict() + {"role", "margin", "verdict"}, or {"missing": reason}
    compared: dict[str, dict] = field(default_factory=dict)
    # "promoted", "kept", "no significant difference" (head_to_head); empty: promoted / rejected
    outcome: str = ""
    mode: str = "threshold"
    chart: str | None = None
    # What the challenger was compared with, in words: "champion v3", "start model builtin:tiny-llama";
    # None when nothing was (a first version promoted unchecked, `first_version: promote`).
    opponent: str | None = None

    @property
    def label(self) -> str:
        return self.outcome or ("promoted" if self.promoted else "rejected")

    @property
    def against(self) -> str:
        """The opponent's role: "start model" for a first version gated against it, else "champion"."""
        return START_MODEL if self.champion_version is None and self.opponent else "champion"


@dataclass(frozen=True)
class _Rule:
    metric: str
    # The challenger must reach champion + offset; offset is negative for an allowed drop.
    offset: float
    text: str


def _rules(gate: GateConfig, against: str = "champion") -> list[_Rule]:
    return [
        _Rule(MT_BENCH_SCORE, gate.min_mt_bench_delta, f"challenger >= {against} + {gate.min_mt_bench_delta:g}"),
        _Rule(ALPACA_WIN_RATE, -gate.max_win_rate_drop, f"challenger >= {against} - {gate.max_win_rate_drop:g}"),
        _Rule(
            PREFERENCE_ACCURACY,
            -gate.max_preference_accuracy_drop,
            f"challenger >= {against} - {gate.max_preference_accuracy_drop:g}",
        ),
    ]


def protocol_metric_names(metric: str, *metric_dicts: dict[str, float] | None) -> list[str]:
    """The names `metric` goes by in these metric dicts, one per protocol (itself when none is present)."""
    if metric not in _PROTOCOL_FAMILIES:
        return [metric]
    family, leaf = _PROTOCOL_FAMILIES[metric]
    names = {
        name for metrics in metric_dicts if metrics for name in metrics
        if name.count("/") == 1 and name.startswith(family) and name.endswith("/" + leaf)
    }
    return sorted(names) or [metric]


def _value(metrics: dict[str, float] | None, name: str) -> float | None:
    if not metrics or name not in metrics or metrics[name] is None:
        return None
    value = float(metrics[name])
    return None if math.isnan(value) else value


def decide(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    gate: GateConfig,
    *,
    challenger_version: str = "",
    champion_version: str | None = None,
    against: str = "champion",
) -> GateDecision:
    """Apply the gate to two flat metric dicts.

    `champion`: the metrics to beat, the champion's or, for a first version, the start model's (`against`
    names which in the rules and the reason; the `compared` entries keep the key "champion" for them).
    `champion=None` means there is nothing to compare with: the version is promoted only when
    `gate.first_version` is `promote`.
    """
    compared: dict[str, dict] = {}
    failures: list[str] = []
    missing: list[str] = []

    def verdict(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted, reason, challenger_version, champion_version, compared)

    if champion is None:
        if gate.first_version != "promote":
            return verdict(False, no_start_evaluation_reason())
        missing = [name for metric in GATED_METRICS for name in protocol_metric_names(metric, challenger)
                   if _value(challenger, name) is None]
        if gate.require_metrics and missing:
            return verdict(False, f"no champion yet, but the challenger lacks required metrics: {', '.join(missing)}")
        return verdict(True, "no champion yet: the first version becomes champion unchecked "
                             "(registry.gate.first_version: promote)")

    for rule in _rules(gate, against):
        for name in protocol_metric_names(rule.metric, challenger, champion):
            mine, theirs = _value(challenger, name), _value(champion, name)
            if mine is None or theirs is None:
                missing.append(name)
                continue
            passed = mine >= theirs + rule.offset - _TOLERANCE
            compared[name] = {
                "challenger": mine,
                "champion": theirs,
                "delta": mine - theirs,
                "rule": rule.text,
                "passed": passed,
            }
            if not passed:
                failures.append(f"{name} {mine:g} vs {against} {theirs:g} (needs {rule.text})")

    if gate.require_metrics and missing:
        return verdict(False, f"missing metrics on the challenger or the {against}: {', '.join(missing)}")
    if failures:
        return verdict(False, "failed: " + "; ".join(failures))
    if not compared:
        return verdict(False, f"no gated metric is present on both the challenger and the {against}")
    passed_text = ", ".join(f"{name} {entry['delta']:+g}" for name, entry in compared.items())
    skipped = f" (skipped, missing: {', '.join(missing)})" if missing else ""
    return verdict(True, f"passed: {passed_text}{skipped}")


def _verdict(entry: dict, primary: bool) -> str:
    low, high, null = entry["low"], entry["high"], entry["null"]
    # Where the difference has its own test (McNemar's for paired accuracy), a claim in the challenger's favour
    # needs that test too: its interval (Agresti-Min) can exclude 0 at a p-value above 1 - confidence, and a
    # promotion must not rest on evidence the reported test calls insignificant. "Worse" needs either alone.
    p_value = entry.get("p_value")
    favoured = p_value is None or p_value < 1.0 - entry["confidence"]
    if primary and low > entry["margin"] and favoured:
        return "above the margin"
    if high < null:
        return "significantly worse"
    if low > null and favoured:
        return "significantly better"
    return "no significant difference"


def decide_head_to_head(
    head_to_head: HeadToHead,
    gate: GateConfig,
    *,
    challenger_version: str = "",
    champion_version: str | None = None,
) -> GateDecision:
    """Promote only when the primary difference's interval clears the margin and nothing regresses."""
    compared: dict[str, dict] = {}
    for metric in gate.gated_metrics:
        difference = head_to_head.differences.get(metric)
        if difference is None:
            compared[metric] = {"missing": head_to_head.missing.get(metric, "not computed")}
            continue
        primary = metric == gate.primary_metric
        entry = difference.as_dict()
        entry["role"] = "primary" if primary else "guard"
        entry["margin"] = (gate.margin if gate.margin is not None else difference.null) if primary else None
        entry["verdict"] = _verdict(entry, primary)
        entry["text"] = difference.text()
        compared[metric] = entry

    def verdict(outcome: str, reason: str) -> GateDecision:
        return GateDecision(outcome == PROMOTED, reason, challenger_version, champion_version, compared,
                            outcome, "head_to_head")

    missing = {m: e["missing"] for m, e in compared.items() if "missing" in e}
    primary = compared[gate.primary_metric]
    if "missing" in primary:
        return verdict(KEPT, f"the primary metric {gate.primary_metric} could not be compared: "
                             f"{primary['missing']}")
    if gate.require_metrics and missing:
        return verdict(KEPT, "missing gated metrics: " + "; ".join(f"{m}: {r}" for m, r in missing.items()))
    regressions = [e["text"] for m, e in compared.items() if e.get("verdict") == "significantly worse"
                   and m != gate.primary_metric]
    margin_text = f"{primary['margin']:g}{primary['unit']}"
    if primary["verdict"] == "above the margin":
        if primary["n"] < gate.min_prompts:
            return verdict(KEPT, f"{primary['text']} clears {margin_text}, but on only {primary['n']} "
                                 f"prompts (registry.gate.min_prompts = {gate.min_prompts})")
        if regressions:
            return verdict(KEPT, f"{primary['text']} clears {margin_text}, but significantly worse: "
                                 + "; ".join(regressions))
        skipped = f" (not compared: {', '.join(missing)})" if missing else ""
        return verdict(PROMOTED, f"{primary['text']} lies above {margin_text}{skipped}")
    if primary["verdict"] == "significantly worse" or regressions:
        worse = [primary["text"]] if primary["verdict"] == "significantly worse" else regressions
        return verdict(KEPT, "the challenger is significantly worse: " + "; ".join(worse))
    if primary["verdict"] == "significantly better":  # better than the champion, not by the margin asked for
        return verdict(KEPT, f"{primary['text']} is better than no difference but does not lie above "
                             f"{margin_text}")
    return verdict(NO_DIFFERENCE, f"{primary['text']} does not lie above {margin_text}")


# --- MLflow ---------------------------------------------------------------------------------------------


def promote(
    config: PipelineConfig,
    version: RegisteredVersion,
    *,
    champion_version: str | None = None,
    dry_run: bool = False,
    api_key: str | None = None,
    judge=None,
    start_report_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> GateDecision:
    """Gate `version` against the champion (the `champion` alias, or `champion_version`).

    Moves `champion` to the challenger when it passes and records the decision on the challenger's version,
    promoted or not; a `dry_run` decides and writes its files under `out_dir` only. The head-to-head judge
    is `judge`, else built from `config.eval.judge` (`api_key` for an openai judge) only when some output
    differs. `start_report_dir`: the start model's evaluation directory; drawn in the summary chart, and,
    with no champion yet and `registry.gate.first_version: beat_start_model`, the opponent itself (without
    it such a version stays challenger).
    """
    from mlflow import MlflowClient

    from orpo.registry import ALIAS_CHAMPION, configure_mlflow, version_metrics

    configure_mlflow(config)
    client = MlflowClient()
    name = version.name
    gate = config.registry.gate
    # Stores return version numbers as int or str; compare and report them as strings.
    champion = str(champion_version) if champion_version else _alias_version(client, name, ALIAS_CHAMPION)
    challenger_version = str(version.version)
    against_start = champion is None and gate.first_version == "beat_start_model"
    opponent = f"champion v{champion}" if champion is not None else None
    start = None
    if against_start:
        opponent = f"{START_MODEL} {_start_model_reference(client, name, challenger_version, config)}"
        start = _start_evaluation(start_report_dir)
    if champion == challenger_version:
        decision = GateDecision(True, "already the champion", challenger_version, champion, {}, mode=gate.mode)
    elif against_start and start is None:
        decision = GateDecision(False, no_start_evaluation_reason(opponent), challenger_version, None, {},
                                KEPT if gate.mode == "head_to_head" else "", gate.mode, opponent=opponent)
    elif gate.mode == "threshold" or (champion is None and start is None):  # first_version: promote
        challenger_metrics = version_metrics(client, name, challenger_version)
        if start is not None:  # the start model's headline metrics, as its evaluation's report.json has them
            theirs = dict((start.report or {}).get("metrics") or {})
        else:
            theirs = version_metrics(client, name, champion) if champion is not None else None
        decision = decide(challenger_metrics, theirs, gate, challenger_version=challenger_version,
                          champion_version=champion, against=START_MODEL if start is not None else "champion")
        if gate.mode != "threshold":
            decision = replace(decision, outcome=PROMOTED if decision.promoted else KEPT, mode=gate.mode)
        decision = replace(decision, opponent=opponent, reason=_against(decision.reason, champion, opponent))
    else:
        out = Path(out_dir) if out_dir else _default_out_dir(config, name, challenger_version, champion)
        decision = _head_to_head(client, config, name, challenger_version, champion, out, opponent=opponent,
                                 start=start, judge=judge, api_key=api_key, start_report_dir=start_report_dir)
    if dry_run:
        log.info("dry run, nothing changed: %s version %s would be %s: %s", name, challenger_version,
                 decision.label, decision.reason)
        return decision
    if decision.promoted and champion != challenger_version:
        client.set_registered_model_alias(name, ALIAS_CHAMPION, challenger_version)
        log.info("promoted %s version %s to %s: %s", name, challenger_version, ALIAS_CHAMPION, decision.reason)
    else:
        log.info("%s version %s stays challenger (%s): %s", name, challenger_version, decision.label,
                 decision.reason)
    _record(client, version, decision)
    return decision


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _default_out_dir(config: PipelineConfig, name: str, challenger: str, champion: str | None) -> Path:
    against = f"v{champion}" if champion is not None else "start"
    return Path(config.workdir) / "gate" / f"{name}-v{challenger}-vs-{against}"


def no_start_evaluation_reason(start_model: str = "the start model") -> str:
    """Why a first version gated against the start model stays challenger without its evaluation."""
    return (f"no champion yet, and no evaluation of the {start_model.removeprefix('the ')} to compare the first "
            "version with, so it is not promoted: set orchestration.evaluate_base_model: true (the pipeline), or "
            "pass the start model's evaluation directory (`orpo gate --start-report DIR`, "
            "`gate_and_promote(start_report_dir=...)`), or set registry.gate.first_version: promote to promote "
            "the first version without a comparison")


def _start_evaluation(start_report_dir: str | Path | None) -> EvaluationFiles | None:
    """The start model's evaluation files; None when no directory was given or it holds no evaluation."""
    if start_report_dir is None or not Path(start_report_dir).is_dir():
        if start_report_dir is not None:
            log.warning("the start model's evaluation directory %s does not exist", start_report_dir)
        return None
    if not evaluation_files(start_report_dir):
        log.warning("%s holds no evaluation files (report.json, model_outputs.json, ...)", start_report_dir)
        return None
    return read_evaluation(start_report_dir)


def _start_model_reference(client, name: str, version: str, config: PipelineConfig) -> str:
    """The model `version` was trained from, as its lineage tags name it (else the configured model)."""
    tags = client.get_model_version(name, version).tags or {}
    return next((tags[key] for key in _START_MODEL_TAGS if tags.get(key)), config.model.name_or_path)


def download_evaluation(client, name: str, version: str, dst: Path) -> EvaluationFiles:
    """A version's evaluation files, read back from its run's `evaluation/` artifacts (empty if none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = client.get_model_version(name, version).run_id
    if not run_id or not client.list_artifacts(run_id, EVALUATION_ARTIFACT):
        log.warning("%s version %s has no %s/ artifacts; it was not evaluated here", name, version,
                    EVALUATION_ARTIFACT)
        return EvaluationFiles(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EVALUATION_ARTIFACT,
                                                    dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        log.warning("could not download the evaluation of %s version %s: %s", name, version, exc)
        return EvaluationFiles(dst)
    return read_evaluation(local)


def _against(reason: str, champion: str | None, opponent: str | None) -> str:
    """A first version's reason says what it was compared with (a champion's reasons need not)."""
    return f"no champion yet; against the {opponent}: {reason}" if champion is None and opponent else reason


def _head_to_head(client, config: PipelineConfig, name: str, challenger: str, champion: str | None, out: Path, *,
                  opponent: str, start: EvaluationFiles | None, judge, api_key: str | None,
                  start_report_dir: str | Path | None) -> GateDecision:
    """The paired comparison with the champion's evaluation, or with `start` (the start model's) when
    `champion` is None; writes decision.json, the annotations and summary.png into `out`."""
    import tempfile

    from evals.alpaca import protocol_kwargs
    from orpo.gate_plots import summary_chart
    from orpo.head_to_head import compare_evaluations, model_estimates

    gate = config.registry.gate
    built = [judge]

    def get_judge():
        if built[0] is None:
            from evals.judges import build_judge

            cache = config.eval.judge.cache_dir or str(Path(config.workdir) / "judge-cache")
            built[0] = build_judge(config.eval.judge, api_key=api_key, cache_dir=cache)
        return built[0]

    stats = dict(confidence=gate.confidence, n_resamples=gate.bootstrap_resamples, seed=gate.seed)
    with tempfile.TemporaryDirectory(prefix="orpo-gate-") as tmp:
        theirs = start if champion is None else download_evaluation(client, name, champion, Path(tmp) / "champion")
        mine = download_evaluation(client, name, challenger, Path(tmp) / "challenger")
        result = compare_evaluations(theirs, mine, get_judge, metrics=gate.gated_metrics,
                                     protocol=protocol_kwargs(config.eval), **stats,
                                     opponent="the champion" if champion is not None else f"the {START_MODEL}")
        decision = decide_head_to_head(result, gate, challenger_version=challenger, champion_version=champion)
        start_estimates = model_estimates(mine, start_model=True, **stats)
        if start is not None:  # already read as the opponent: the same directory, not read again
            start_estimates.update(model_estimates(start, **stats))
        elif start_report_dir is not None:
            start_estimates.update(model_estimates(read_evaluation(start_report_dir), **stats))
        models = {START_MODEL: start_estimates}
        if champion is not None:
            models[f"champion v{champion}"] = model_estimates(theirs, **stats)
        models[f"challenger v{challenger}"] = model_estimates(mine, **stats)
    out.mkdir(parents=True, exist_ok=True)
    chart = summary_chart(models, decision.compared, out / "summary.png",
                          title=f"{name}: challenger v{challenger} vs {opponent} ({decision.label})")
    (out / "head_to_head_annotations.json").write_text(
        json.dumps(result.annotations, indent=2, ensure_ascii=False), encoding="utf-8")
    decision = replace(decision, chart=str(chart), opponent=opponent,
                       reason=_against(decision.reason, champion, opponent))
    (out / "decision.json").write_text(json.dumps(decision_record(decision), indent=2), encoding="utf-8")
    return decision


def decision_record(decision: GateDecision) -> dict:
    """The decision as plain JSON (decision.json, the `gate.compared` tag)."""
    return {"decision": decision.label, "promoted": decision.promoted, "reason": decision.reason,
            "mode": decision.mode, "challenger_version": decision.challenger_version,
            "champion_version": decision.champion_version, "opponent": decision.opponent,
            "compared": decision.compared}


def _compared_tag(compared: dict[str, dict]) -> str:
    text = json.dumps(compared, sort_keys=True)
    if len(text) > _MAX_TAG:  # drop the prose first; the numbers are what a reader parses
        slim = {m: {k: v for k, v in e.items() if k not in ("text", "note", "label")} for m, e in compared.items()}
        text = json.dumps(slim, sort_keys=True)
    return text if len(text) <= _MAX_TAG else json.dumps({"truncated": True, "see": "gate/decision.json"})


def decision_markdown(decision: GateDecision, *, header: bool = True) -> str:
    """The decision as a markdown table: each difference, its interval, n, the test and the seed."""
    opponent = f" against the {decision.opponent}" if decision.opponent else ""
    lines = [f"**Gate ({decision.mode}{opponent}): {decision.label}**. {decision.reason}", ""] if header else []
    if decision.mode == "head_to_head" and decision.compared:
        lines += [f"| metric | challenger vs {decision.against} | interval | n | test | seed | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for metric, e in decision.compared.items():
            if "missing" in e:
                lines.append(f"| {metric} | - | - | - | - | - | not compared: {e['missing']} |")
                continue
            interval = f"[{e['low']:.4g}, {e['high']:.4g}] ({e['confidence']:.0%})"
            margin = f"; margin {e['margin']:g}" if e.get("margin") is not None else ""
            p = f", p={e['p_value']:.3g}" if e.get("p_value") is not None else ""
            lines.append(f"| {metric} ({e['role']}) | {e['estimate']:.4g}{e['unit']} | {interval} | {e['n']} | "
                         f"{e['test']}{p} | {e['seed'] if e['seed'] is not None else '-'} | "
                         f"{e['verdict']}{margin} |")
    elif decision.compared:
        lines += [f"| metric | challenger | {decision.against} | delta | rule | passed |", "|---|---|---|---|---|---|"]
        for metric, e in decision.compared.items():
            lines.append(f"| {metric} | {e['challenger']:.4g} | {e['champion']:.4g} | {e['delta']:+.4g} | "
                         f"{e['rule']} | {e['passed']} |")
    return "\n".join(lines)


def _record(client, version: RegisteredVersion, decision: GateDecision) -> None:
    from orpo.registry import refresh_description

    tags = {
        TAG_DECISION: decision.label,
        TAG_REASON: decision.reason[:_MAX_TAG],
        TAG_AGAINST: decision.champion_version or "none",
        TAG_OPPONENT: decision.opponent or "none",
        TAG_MODE: decision.mode,
        TAG_COMPARED: _compared_tag(decision.compared),
    }
    # One short tag per compared metric, so the version page shows the numbers without parsing JSON.
    for metric, entry in decision.compared.items():
        if "passed" in entry:
            tags[f"gate.delta.{metric}"] = f"{entry['delta']:+.4g} ({'pass' if entry['passed'] else 'fail'})"
        elif "text" in entry:
            tags[TAG_DIFFERENCE_PREFIX + metric] = f"{entry['text']}: {entry['verdict']}"[:_MAX_TAG]
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    refresh_description(client, version.name, str(version.version))
    if decision.mode == "head_to_head" and decision.compared:
        # The description already says "Gate: <decision> (<reason>)" (refresh_description, from the tags).
        described = client.get_model_version(version.name, version.version).description or ""
        table = decision_markdown(decision, header=False)
        client.update_model_version(version.name, version.version,
                                    (described + "\n\n" + table)[:_MAX_DESCRIPTION])
    if decision.chart and Path(decision.chart).parent.is_dir():
        client.log_artifacts(version.run_id, str(Path(decision.chart).parent), GATE_ARTIFACT)


def resolve_version(config: PipelineConfig, uri: str) -> RegisteredVersion:
    """`models:/NAME/N` or `models:/NAME@ALIAS` as a registered version; ValueError naming what is wrong."""
    import re

    from mlflow.exceptions import MlflowException

    from orpo.registry import RegisteredVersion, configure_mlflow, mlflow_client

    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", uri.strip())
    if not match:
        raise ValueError(f"{uri!r} is not a model version URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    name, number, alias = match.groups()
    configure_mlflow(config)
    client = mlflow_client()
    try:
        found = client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ValueError(f"{uri} not found in {config.resolved_tracking_uri()}: {exc.message}") from None
    return RegisteredVersion.existing(found)
