"""AlpacaEval-style pairwise judging against baseline outputs, and AlpacaEval's metrics.

Judge prompt: the `chatgpt` evaluator of the installed `alpaca_eval` package
(`alpaca_eval/evaluators_configs/chatgpt/basic_prompt.txt`), read from the package at run time. It asks
for exactly "Output (a)" or "Output (b)", which any chat-completions judge can answer, and its config's
regular expressions parse the answer (alpaca_eval's own `regex_parser`). The `hf` judge instead compares
the likelihood of the two answers (like alpaca_eval's logprob parser), which gives a preference
probability even for a small model that does not follow the format.

Order: each instruction's two outputs are shown in a random order (seeded, recorded in the annotation as
`is_swapped`), so a judge's position bias cannot favour either side. Annotations follow AlpacaEval's
format: `output_1` is always the baseline, `output_2` the model, `preference` in [1, 2] (2 = model wins).

Metrics: `alpaca_eval.metrics.get_winrate` for win rate, standard error, wins, draws and the discrete win
rate. Length-controlled win rate, in order of preference:
1. `length_controlled_v1`, alpaca_eval's leaderboard GLM, when `df_gamed.csv` is given (a local path);
2. `length_controlled_minimal` (length + baseline terms only), fitted on the annotations alone, offline.
alpaca_eval's GLM code downloads `df_gamed.csv` from the hub even for the minimal GLM and saves weights
into site-packages by default; here the download is replaced by the local file (or, for the minimal GLM,
an all-zero instruction-difficulty table that its formula never reads) and weights are never saved.
`lc_from_glm_weights` reproduces a leaderboard model's LC win rate from published GLM weights (see there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVALUATOR = "chatgpt"
TEMPLATE_FILE = "chatgpt/basic_prompt.txt"
# The chatgpt evaluator config's completion_parser_kwargs.outputs_to_match.
OUTPUTS_TO_MATCH = {1: r"(?:^|\n) ?Output \(a\)", 2: r"(?:^|\n) ?Output \(b\)"}
HF_OPTIONS = ("Output (a)", "Output (b)")


@dataclass
class AlpacaMetrics:
    """AlpacaEval's leaderboard columns plus how the LC win rate was computed and parse failures."""

    win_rate: float
    standard_error: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    discrete_win_rate: float
    avg_length: float
    length_controlled_winrate: float | None
    lc_standard_error: float | None
    lc_method: str
    n_parse_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluator_template(evaluator_dir: str = TEMPLATE_FILE) -> str:
    """The prompt template file shipped with the installed alpaca_eval's evaluator configs."""
    import alpaca_eval

    path = Path(alpaca_eval.__file__).parent / "evaluators_configs" / evaluator_dir
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the installed alpaca_eval does not ship evaluator {evaluator_dir}")
    return path.read_text(encoding="utf-8")


def pairwise_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
    """Fill the template (plain substitution: the templates hold literal braces) and split its ChatML turns."""
    from alpaca_eval.utils import prompt_to_chatml

    text = template.replace("{instruction}", instruction)
    # Outputs are substituted last so that braces inside them are never read as placeholders.
    text = text.replace("{output_1}", "\x00OUT1\x00").replace("{output_2}", "\x00OUT2\x00")
    text = text.replace("\x00OUT1\x00", output_1).replace("\x00OUT2\x00", output_2)
    return [{"role": m["role"], "content": m["content"]} for m in prompt_to_chatml(text)]


def parse_preference(completion: str | None) -> int | None:
    """1 for "Output (a)", 2 for "Output (b)" (the first match in the text), None if neither appears."""
    from alpaca_eval.completion_parsers import regex_parser

    if not completion:
        return None
    try:
        parsed = regex_parser(completion, dict(OUTPUTS_TO_MATCH))
    except Exception:  # noqa: BLE001 - the parser raises on odd input; that is an unparseable judgment
        return None
    return int(parsed[0]) if parsed else None


def swap_orders(n: int, seed: int) -> list[bool]:
    """Whether each comparison shows the model first (seeded fair coin flips)."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def judge_pairwise(
    judge,
    instructions: Sequence[dict[str, Any]],
    model_outputs: Sequence[dict[str, Any]],
    *,
    seed: int = 0,
    template: str | None = None,
) -> list[dict[str, Any]]:
    """Annotate model outputs against the baselines in AlpacaEval's annotation format.

    `instructions` are AlpacaEval records (baseline in `output`); `model_outputs` the model's records in
    the same order. `preference` is NaN where the judgment was unparseable.
    """
    if len(instructions) != len(model_outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(model_outputs)} model outputs")
    template = template or evaluator_template()
    swapped = swap_orders(len(instructions), seed)
    prompts = []
    for base, mine, swap in zip(instructions, model_outputs, swapped):
        first, second = (mine["output"], base["output"]) if swap else (base["output"], mine["output"])
        prompts.append(pairwise_messages(template, base["instruction"], first, second))
    # position_pref: 1 = first shown output preferred, 2 = second; a float in [1, 2] for the hf judge.
    raw: list[str | None]
    if getattr(judge, "kind", "") == "hf" and hasattr(judge, "score_options"):
        probabilities = judge.score_options(prompts, HF_OPTIONS)
        position_prefs: list[float | None] = [1.0 + p[1] for p in probabilities]
        raw = [json.dumps({"Output (a)": p[0], "Output (b)": p[1]}) for p in probabilities]
    else:
        raw = judge.complete(prompts)
        position_prefs = [None if (p := parse_preference(c)) is None else float(p) for c in raw]
    annotations = []
    for base, mine, swap, pref, completion in zip(instructions, model_outputs, swapped, position_prefs, raw):
        if pref is None:
            preference = math.nan
        else:
            preference = 3.0 - pref if swap else pref  # map the shown position back to baseline=1 / model=2
        annotations.append(
            {
                "instruction": base["instruction"],
                "output_1": base["output"],
                "generator_1": base.get("generator", "baseline"),
                "dataset": base.get("dataset", "alpaca_eval"),
                "output_2": mine["output"],
                "generator_2": mine["generator"],
                "annotator": f"{judge.kind}:{judge.model}:{EVALUATOR}",
                "preference": preference,
                "is_swapped": swap,
                "raw_completion": completion,
                "index": base.get("index"),
            }
        )
    return annotations


@contextlib.contextmanager
def _local_glm_inputs(df_gamed: str | Path | None, n_instructions: int) -> Iterator[None]:
    """Serve alpaca_eval's GLM its `df_gamed.csv` from disk instead of the hub.

    Without a real file, a table of zero instruction difficulties stands in; only the minimal GLM, whose
    formula has no instruction-difficulty term, may run on it.
    """
    import pandas as pd
    from alpaca_eval.metrics import glm_winrate

    with tempfile.TemporaryDirectory(prefix="orpo-lc-") as tmp:
        if df_gamed is None:
            stand_in = Path(tmp) / "df_gamed.csv"
            pd.DataFrame(
                {"model": "none", "index": range(n_instructions), "instruction_difficulty": 0.0}
            ).to_csv(stand_in, index=False)
            path = stand_in
        else:
            path = Path(df_gamed)
            if not path.is_file():
                raise FileNotFoundError(f"eval.lc_glm_df_gamed: {path} does not exist")

        def local_download(*, repo_id: str, filename: str, **_: Any) -> str:
            if filename != "df_gamed.csv":
                raise RuntimeError(f"alpaca_eval asked for {repo_id}/{filename}; offline evaluation has no such file")
            return str(path)

        original = glm_winrate.hf_hub_download
        glm_winrate.hf_hub_download = local_download
        try:
            yield
        finally:
            glm_winrate.hf_hub_download = original


def _lc_with_glm(df, glm_name: str, df_gamed: str | Path | None) -> tuple[float, float]:
    import sklearn
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    n_instructions = int(df.index.max()) + 1 if len(df) else 0
    with _local_glm_inputs(df_gamed, n_instructions), sklearn.config_context():
        # config_context restores sklearn's global config, which the GLM fit switches (metadata routing).
        metrics = get_length_controlled_winrate(
            df, glm_name=glm_name, save_weights_dir=None, is_add_glm_preference_inplace=False
        )
    return float(metrics["length_controlled_winrate"]), float(metrics["lc_standard_error"])


def _annotation_frame(annotations: Sequence[dict[str, Any]] | Any):
    import pandas as pd

    df = pd.DataFrame(list(annotations)) if not isinstance(annotations, pd.DataFrame) else annotations.copy()
    missing = [c for c in ("preference", "output_1", "output_2", "generator_1", "generator_2") if c not in df]
    if missing:
        raise ValueError(f"annotations lack {', '.join(missing)} (AlpacaEval annotation format)")
    # The GLM indexes instruction features by the instruction's position in the full AlpacaEval set.
    if "index" in df:
        if df["index"].notna().all():
            df.index = df["index"].astype(int)
        df = df.drop(columns=["index"])
    return df


def alpaca_metrics(
    annotations: Sequence[dict[str, Any]] | Any,
    *,
    df_gamed: str | Path | None = None,
    glm_weights: str | Path | None = None,
    reference_leaderboard: str | Path | None = None,
) -> AlpacaMetrics:
    """AlpacaEval metrics of one model's annotations (one generator_2), computed with alpaca_eval's code.

    LC win rate: from published GLM weights (`glm_weights`, see `lc_from_glm_weights`) when they hold
    this model, else `length_controlled_v1` with `df_gamed`, else `length_controlled_minimal`.
    """
    from alpaca_eval.metrics import get_winrate

    df = _annotation_frame(annotations)
    if df["generator_2"].nunique() != 1:
        raise ValueError(f"annotations hold several models: {sorted(df['generator_2'].unique())}")
    valid = df[df["preference"].notna()]
    failures = len(df) - len(valid)
    if valid.empty:
        raise ValueError("no annotation has a preference; every judgment was unparseable")
    head = get_winrate(valid)
    model = str(df["generator_2"].iloc[0])
    lc: float | None = None
    lc_se: float | None = None
    method = "none"
    if glm_weights is not None:
        lc = lc_from_glm_weights(model, glm_weights, reference_leaderboard)
        if lc is not None:
            method = "glm_weights(length_controlled_v1)"
    length_spread = (valid["output_1"].str.len() - valid["output_2"].str.len()).std()
    if lc is None and len(valid) < 10:  # the GLM's 5-fold cross-validation needs a few rows per fold
        log.warning("only %d valid annotations; the length-controlled GLM needs at least 10", len(valid))
    elif lc is None and not length_spread > 0:  # the GLM standardises length differences by their spread
        log.warning("all length differences are equal; the length-controlled GLM cannot be fitted")
    elif lc is None:
        glm = "length_controlled_v1" if df_gamed is not None else "length_controlled_minimal"
        lc, lc_se = _lc_with_glm(valid, glm, df_gamed)
        method = glm
    return AlpacaMetrics(
        win_rate=float(head["win_rate"]),
        standard_error=float(head["standard_error"]),
        n_wins=int(head["n_wins"]),
        n_wins_base=int(head["n_wins_base"]),
        n_draws=int(head["n_draws"]),
        n_total=int(head["n_total"]),
        discrete_win_rate=float(head["discrete_win_rate"]),
        avg_length=float(df["output_2"].str.len().mean()),
        length_controlled_winrate=lc,
        lc_standard_error=lc_se,
        lc_method=method,
        n_parse_failures=failures,
    )


def _package_leaderboard() -> Path:
    import alpaca_eval

    return (
        Path(alpaca_eval.__file__).parent
        / "leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
    )


def lc_from_glm_weights(
    model: str,
    glm_weights: str | Path,
    reference_leaderboard: str | Path | None = None,
    *,
    baseline: str = "gpt4_1106_preview",
) -> float | None:
    """A leaderboard model's LC win rate from its published GLM weights, offline. None if it has none.

    alpaca_eval's `predict_winrate` gives LC = mean over instructions i of
    logistic(dw_baseline + dw_difficulty * difficulty_i), dw = the model's weights minus the baseline's.
    It needs the per-instruction `instruction_difficulty.csv` from the hub, which is unavailable offline.
    The mean only depends on the distribution of difficulties, so that distribution is recovered instead:
    a non-negative mixture over a grid of difficulty values (non-negative least squares, weights summing to
    one) fitted to the LC win rates of the *other* models in the reference leaderboard (by default the one
    the alpaca_eval package ships), then applied to this model's weights. Held out this way, the
    leaderboard's published values are reproduced to within a few hundredths of a point.
    """
    import numpy as np
    import pandas as pd
    from scipy.optimize import nnls

    weights = pd.read_csv(glm_weights, index_col=0)
    if model not in weights.index or baseline not in weights.index:
        return None
    board = pd.read_csv(reference_leaderboard or _package_leaderboard(), index_col=0)
    delta = weights - weights.loc[baseline]
    gamed = delta["not_gamed_baseline.astype(float)"]
    difficulty = delta["instruction_difficulty"]
    train = [
        m
        for m in weights.index
        if m != model and m in board.index and pd.notna(board.loc[m, "length_controlled_winrate"])
    ]
    if len(train) < 20:
        log.warning("only %d leaderboard models to recover the difficulty distribution from", len(train))
        return None
    grid = np.linspace(-4.0, 4.0, 161)

    def logistic(x):
        return 1.0 / (1.0 + np.exp(-x))

    design = np.array([logistic(gamed[m] + difficulty[m] * grid) for m in train])
    target = np.array([board.loc[m, "length_controlled_winrate"] / 100.0 for m in train])
    # A heavily weighted extra row pins the mixture's total mass to one.
    mixture, _ = nnls(np.vstack([design, 100.0 * np.ones_like(grid)]), np.append(target, 100.0))
    return float(logistic(gamed[model] + difficulty[model] * grid) @ mixture * 100.0)


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of AlpacaEval annotations")
    return data
