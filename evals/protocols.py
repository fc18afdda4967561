"""Which protocol produced a number, and the metric-name prefix that says so.

The leaderboard names are used only for the official protocol run end to end on the official data:
`alpaca_eval2/...` (AlpacaEval 2.0: `weighted_alpaca_eval_gpt4_turbo`, annotator gpt-4-1106-preview,
the 805 instructions with the gpt4_1106_preview baseline, alpaca_eval's annotator seed 0) and `mt_bench/...` (FastChat single grading with
GPT-4, its judge prompts and GPT-4 reference answers, the 80 questions, answers generated as FastChat's
gen_model_answer does: up to 1024 new tokens). Any deviation gets its own prefix, the first that applies in
this order: a local hf judge, a custom prompt, another evaluator, another judge model, other data or a
subset, other generation settings. Every prefix has a one-line description for reports and tables.
"""

from __future__ import annotations

from dataclasses import dataclass

OFFICIAL_ALPACA_EVALUATOR = "weighted_alpaca_eval_gpt4_turbo"
OFFICIAL_ALPACA_ANNOTATOR = "gpt-4-1106-preview"
OFFICIAL_ALPACA_SEED = 0  # alpaca_eval's annotator seed: which output its judge is shown first
OFFICIAL_MT_BENCH_JUDGE = "gpt-4"
# FastChat gen_model_answer.py's --max-new-token default: the answers MT-Bench's scores were produced from.
OFFICIAL_MT_BENCH_MAX_NEW_TOKENS = 1024

PREFIX_DESCRIPTIONS = {
    "alpaca_eval2": "AlpacaEval 2.0 official (weighted_alpaca_eval_gpt4_turbo, gpt-4-1106-preview, 805 instructions)",
    "alpaca_eval2_subset": "AlpacaEval 2.0 protocol on other data or a subset: not leaderboard-comparable",
    "alpaca_eval2_other_annotator": "AlpacaEval 2.0 protocol with another annotator model: not leaderboard-comparable",
    "alpaca_eval2_other_seed": "AlpacaEval 2.0 protocol with another annotator seed (other output orders shown "
                               "to the judge): not the leaderboard's judgments",
    "alpaca_custom_prompt": "AlpacaEval-style with a custom prompt: not leaderboard-comparable",
    "alpaca_local_judge": "AlpacaEval-style with a local hf judge: plumbing check, not leaderboard-comparable",
    "mt_bench": "MT-Bench official (FastChat single grading, gpt-4 judge, GPT-4 references, 80 questions, answers of "
                "up to 1024 new tokens)",
    "mt_bench_subset": "MT-Bench protocol on other questions or a subset: not leaderboard-comparable",
    "mt_bench_other_judge": "MT-Bench protocol with another judge model: not leaderboard-comparable",
    "mt_bench_custom_prompts": "MT-Bench-style with non-FastChat judge prompts: not leaderboard-comparable",
    "mt_bench_local_judge": "MT-Bench-style with a local hf judge: plumbing check, not leaderboard-comparable",
    "mt_bench_other_generation": "MT-Bench protocol on answers generated with other settings than FastChat's "
                                 "(max_new_tokens): not leaderboard-comparable",
}
PREFIX_SHORT = {
    "alpaca_eval2": "AlpacaEval 2.0 official",
    "alpaca_eval2_subset": "AE2 protocol, subset/other data",
    "alpaca_eval2_other_annotator": "AE2 protocol, other annotator",
    "alpaca_eval2_other_seed": "AE2 protocol, other annotator seed",
    "alpaca_custom_prompt": "custom prompt (unofficial)",
    "alpaca_local_judge": "local hf judge (unofficial)",
    "mt_bench": "MT-Bench official",
    "mt_bench_subset": "MT-Bench protocol, subset/other data",
    "mt_bench_other_judge": "MT-Bench protocol, other judge",
    "mt_bench_custom_prompts": "custom prompts (unofficial)",
    "mt_bench_local_judge": "local hf judge (unofficial)",
    "mt_bench_other_generation": "MT-Bench protocol, other answer length",
}
LC_OFFICIAL = "length_controlled_winrate"  # alpaca_eval's length_controlled_v1 GLM
LC_MINIMAL = "lc_minimal_glm_winrate"  # length + baseline terms only, fitted on this model's annotations


@dataclass(frozen=True)
class Protocol:
    """A protocol as run: its metric prefix, whether it is the official one, and what differs."""

    prefix: str
    official: bool
    details: str

    @property
    def description(self) -> str:
        return PREFIX_DESCRIPTIONS.get(self.prefix, self.prefix) + (f" [{self.details}]" if self.details else "")


def _protocol(official_prefix: str, details: str, deviations: list[tuple[str, str]]) -> Protocol:
    """The official protocol when nothing deviates, else the first deviation's prefix, all of them listed."""
    if not deviations:
        return Protocol(official_prefix, True, details)
    return Protocol(deviations[0][0], False, "; ".join([details, *(d for _, d in deviations)]))


def alpaca_protocol(*, judge_kind: str, evaluator: str, annotator_model: str, custom_prompt: bool,
                    official_data: bool, subset: bool, seed: int) -> Protocol:
    """`seed`: the annotator seed the outputs' order was randomised with (alpaca_eval's is 0)."""
    deviations = []
    if judge_kind != "openai":
        deviations.append(("alpaca_local_judge", f"hf judge {annotator_model}"))
    if custom_prompt:
        deviations.append(("alpaca_custom_prompt", "custom prompt template"))
    if evaluator != OFFICIAL_ALPACA_EVALUATOR:
        deviations.append((f"alpaca_{evaluator}", f"evaluator {evaluator}"))
    if judge_kind == "openai" and annotator_model != OFFICIAL_ALPACA_ANNOTATOR:
        deviations.append(("alpaca_eval2_other_annotator", f"annotator {annotator_model}"))
    if not official_data:
        deviations.append(("alpaca_eval2_subset", "not the official 805-instruction file"))
    if subset:
        deviations.append(("alpaca_eval2_subset", "a subset of the instructions"))
    if seed != OFFICIAL_ALPACA_SEED:
        deviations.append(("alpaca_eval2_other_seed", f"annotator seed {seed}, not alpaca_eval's {OFFICIAL_ALPACA_SEED}"))
    return _protocol("alpaca_eval2", f"evaluator {evaluator}, annotator {annotator_model}", deviations)


def mt_bench_protocol(*, judge_kind: str, judge_model: str, fastchat_prompts: bool, official_questions: bool,
                      official_references: bool, subset: bool, max_new_tokens: int) -> Protocol:
    """`max_new_tokens`: the answers' generation limit (FastChat's is 1024; other limits change the answers)."""
    deviations = []
    if judge_kind != "openai":
        deviations.append(("mt_bench_local_judge", f"hf judge {judge_model}"))
    if not fastchat_prompts:
        deviations.append(("mt_bench_custom_prompts", "not FastChat's judge_prompts.jsonl"))
    if judge_kind == "openai" and judge_model != OFFICIAL_MT_BENCH_JUDGE:
        deviations.append(("mt_bench_other_judge", f"judge {judge_model}"))
    if not official_questions:
        deviations.append(("mt_bench_subset", "not the official 80 questions"))
    if not official_references:
        deviations.append(("mt_bench_subset", "not FastChat's GPT-4 reference answers"))
    if subset:
        deviations.append(("mt_bench_subset", "a subset of the questions"))
    if max_new_tokens != OFFICIAL_MT_BENCH_MAX_NEW_TOKENS:
        deviations.append(("mt_bench_other_generation", f"answers generated with max_new_tokens={max_new_tokens}, "
                                                         f"not FastChat's {OFFICIAL_MT_BENCH_MAX_NEW_TOKENS}"))
    return _protocol("mt_bench", f"judge {judge_model}", deviations)


def describe_metric(name: str, *, short: bool = False) -> str:
    """The protocol behind a metric name (its prefix), for tables; '' for metrics without a judge protocol."""
    prefix = name.split("/", 1)[0]
    table = PREFIX_SHORT if short else PREFIX_DESCRIPTIONS
    if prefix in table:
        text = table[prefix]
        if name.endswith("/" + LC_MINIMAL):
            text += ", minimal LC GLM" if short else "; LC from the minimal GLM, not the leaderboard's"
        return text
    if prefix.startswith("alpaca_"):
        evaluator = prefix[len("alpaca_"):]
        return (f"evaluator {evaluator} (unofficial)" if short else
                f"AlpacaEval-style with alpaca_eval evaluator {evaluator}: not leaderboard-comparable")
    return ""
