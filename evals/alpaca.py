"""AlpacaEval: annotate model outputs against the baseline with alpaca_eval's own evaluator, and its metrics.

The protocol is an alpaca_eval evaluator config read from the installed package (default
`weighted_alpaca_eval_gpt4_turbo`, the AlpacaEval 2.0 leaderboard's): its prompt template file, its
decoding settings (`max_tokens: 1`, `temperature: 1`, `logprobs`, `top_logprobs: 5`), its completion parser
and its parser arguments. Prompts are built by alpaca_eval's own functions in the order its annotator uses
them: `RandomSwitchTwoColumnsProcessor` swaps output_1/output_2 with the seed string alpaca_eval derives
from the instruction and the annotator seed, `utils.make_prompts` fills the template, the openai decoder's
strip + `prompt_to_chatml` make the messages, and the request carries the config's decoding arguments plus
the `top_p: 1.0` that alpaca_eval's openai decoder adds. The parser turns the returned top logprobs into a
continuous preference (`logprob_parser`: 2 - P(first shown)), mapped back to baseline=1 / model=2 where the
order was switched. Identical outputs are ties (1.5) without a request, as alpaca_eval does.

A local `hf` judge gets the same prompt and scores the parser's tokens by likelihood (the probability a
`logprob_parser` would read from an endpoint), so its annotations share the format but not the judge.

Metrics: `alpaca_eval.metrics.get_winrate` (win rate, standard error, wins, draws, discrete win rate) over
all annotations (it leaves out unparseable ones itself). Length-controlled win rate with alpaca_eval's GLM,
fitted on the parseable rows and predicted over all rows as upstream:
1. `length_controlled_v1`, the leaderboard's GLM, when `df_gamed.csv` is given (a local path);
2. `length_controlled_minimal` (length + baseline terms only), fitted on the annotations alone, offline:
   not the leaderboard's LC, and named apart by the caller.
A fit that cannot be made (under 10 parseable rows, no length spread, or every weight regularised to zero,
which predicts a flat 50%) gives no LC.
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
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.protocols import OFFICIAL_ALPACA_EVALUATOR

log = logging.getLogger(__name__)

DEFAULT_EVALUATOR = OFFICIAL_ALPACA_EVALUATOR  # the AlpacaEval 2.0 leaderboard's annotator config
# Request fields of an evaluator's completions_kwargs that a chat-completions call takes as they are.
_REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "logprobs", "top_logprobs", "seed", "stop")


@dataclass
class AlpacaMetrics:
    """AlpacaEval's leaderboard columns plus how the LC win rate was computed and failures."""

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


@dataclass
class Evaluator:
    """An alpaca_eval evaluator config as the installed package ships it."""

    name: str
    template: str
    model: str
    request: dict[str, Any]
    parser: Callable[..., list[Any]]
    parser_kwargs: dict[str, Any] = field(default_factory=dict)
    completion_key: str = "completions"
    is_strip: bool = True

    @property
    def uses_logprobs(self) -> bool:
        return self.parser.__name__ == "logprob_parser"


def _configs_dir() -> Path:
    import alpaca_eval

    return Path(alpaca_eval.__file__).parent / "evaluators_configs"


def load_evaluator(name: str = DEFAULT_EVALUATOR) -> Evaluator:
    """Read evaluator `name` (prompt, decoding, parser) from the installed alpaca_eval package."""
    import yaml
    from alpaca_eval import completion_parsers

    path = _configs_dir() / name / "configs.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; eval.alpaca_evaluator={name!r} is not an evaluator of the "
                                "installed alpaca_eval")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))[name]
    if config.get("fn_completions") != "openai_completions" or int(config.get("batch_size", 1)) != 1:
        raise ValueError(f"{path}: only openai_completions evaluators with batch_size 1 are supported")
    kwargs = dict(config.get("completions_kwargs", {}))
    model = kwargs.pop("model_name")
    unknown = sorted(set(kwargs) - set(_REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"{path}: completions_kwargs {unknown} are not supported by this driver")
    # alpaca_eval's openai decoder sends top_p (default 1.0) and temperature (default 0.7) when unset.
    request = {"top_p": 1.0, "temperature": 0.7, **kwargs}
    return Evaluator(
        name=name,
        template=(_configs_dir() / config["prompt_template"]).read_text(encoding="utf-8"),
        model=model,
        request=request,
        parser=getattr(completion_parsers, config.get("fn_completion_parser", "regex_parser")),
        parser_kwargs=dict(config.get("completion_parser_kwargs", {})),
        completion_key=config.get("completion_key", "completions"),
    )


def switched_orders(instructions: Sequence[str], seed: int) -> list[bool]:
    """Whether alpaca_eval's annotator (seed `seed`) shows the model's output first, per instruction."""
    import pandas as pd
    from alpaca_eval.processors import RandomSwitchTwoColumnsProcessor

    if not instructions:
        return []
    frame = pd.DataFrame({"instruction": list(instructions), "output_1": "", "output_2": ""})
    # The same processor and arguments as SinglePairwiseAnnotator's (switch column name included: it is
    # part of the seed string).
    processor = RandomSwitchTwoColumnsProcessor(
        two_columns_to_switch=["output_1", "output_2"], random_seed_columns=["instruction"],
        _switch_column="is_switched_outputs", seed=seed,
    )
    return [bool(v) for v in processor.preprocess(frame)["is_switched_outputs"]]


def pairwise_messages(evaluator: Evaluator, instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
    """The chat messages alpaca_eval sends for one comparison shown as (output_1, output_2)."""
    import pandas as pd
    from alpaca_eval.utils import make_prompts, prompt_to_chatml

    frame = pd.DataFrame([{"instruction": instruction, "output_1": output_1, "output_2": output_2}])
    prompt = make_prompts(frame, evaluator.template, batch_size=1)[0][0]
    return prompt_to_chatml(prompt.strip() if evaluator.is_strip else prompt)


def parse_completion(evaluator: Evaluator, text: str | None, choice: dict[str, Any] | None) -> float:
    """The evaluator's parser on one completion: the preference for the shown order, NaN if unparseable."""
    completion: Any = choice if evaluator.completion_key == "completions_all" else text
    if not completion:
        return math.nan
    try:
        parsed = evaluator.parser(completion, **evaluator.parser_kwargs)
    except Exception as exc:  # noqa: BLE001 - alpaca_eval's parsers raise on odd input: unparseable
        log.debug("unparseable judgment (%s): %r", exc, text)
        return math.nan
    if len(parsed) != 1:  # alpaca_eval sets a batch's annotations to NaN when their number is off
        return math.nan
    try:
        return float(parsed[0])
    except (TypeError, ValueError):
        return math.nan


def _hf_preferences(judge, evaluator: Evaluator, prompts: list[list[dict[str, str]]]) -> list[tuple[float, str]]:
    """A local judge's preference: the parser's tokens scored by likelihood, combined as logprob_parser does."""
    if not evaluator.uses_logprobs:
        raise ValueError(f"the hf judge needs a logprob_parser evaluator; {evaluator.name} parses text")
    numerator = evaluator.parser_kwargs["numerator_token"]
    options = list(dict.fromkeys([numerator, *evaluator.parser_kwargs["denominator_tokens"]]))
    out = []
    for probabilities in judge.score_options(prompts, options):
        scores = dict(zip(options, probabilities))
        share = scores[numerator] / sum(scores[t] for t in evaluator.parser_kwargs["denominator_tokens"])
        out.append((2.0 - share, json.dumps(scores)))
    return out


def protocol_kwargs(eval_config) -> dict[str, Any]:
    """`judge_pairwise` keyword arguments that select the configured protocol (an `EvalConfig`).

    `judge_pairwise(judge, rows, outputs, **protocol_kwargs(config.eval))` annotates exactly as the
    evaluation does: evaluator `eval.alpaca_evaluator`, annotator `eval.judge.alpaca_annotator_model` for an
    endpoint judge, alpaca_eval seed `eval.seed`.
    """
    kwargs: dict[str, Any] = {"seed": eval_config.seed, "evaluator": eval_config.alpaca_evaluator}
    if eval_config.judge.kind == "openai":
        kwargs["annotator_model"] = eval_config.judge.alpaca_annotator_model
    return kwargs


def judge_pairwise(
    judge,
    instructions: Sequence[dict[str, Any]],
    model_outputs: Sequence[dict[str, Any]],
    *,
    seed: int = 0,
    evaluator: str | Evaluator = DEFAULT_EVALUATOR,
    annotator_model: str | None = None,
    template: str | None = None,
) -> list[dict[str, Any]]:
    """Annotate model outputs against the baselines in AlpacaEval's annotation format.

    `instructions` are AlpacaEval records (baseline in `output`, shown as output_1); `model_outputs` the
    model's records in the same order (output_2). `preference` is in [1, 2] (2 = model wins), 1.5 for
    identical outputs (no request), NaN where the judgment failed or was unparseable. `seed` is alpaca_eval's
    annotator seed (0 = its default); `evaluator` an alpaca_eval evaluator config name; `annotator_model`
    the endpoint model (default: the evaluator config's `model_name`); `template` replaces the prompt (not
    the official protocol).
    """
    if len(instructions) != len(model_outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(model_outputs)} model outputs")
    spec = load_evaluator(evaluator) if isinstance(evaluator, str) else evaluator
    if template is not None:
        spec = Evaluator(**{**asdict(spec), "template": template, "parser": spec.parser})
    model = annotator_model or spec.model
    switched = switched_orders([row["instruction"] for row in instructions], seed)
    todo = [i for i, (base, mine) in enumerate(zip(instructions, model_outputs)) if base["output"] != mine["output"]]
    prompts = []
    for i in todo:
        base, mine = instructions[i]["output"], model_outputs[i]["output"]
        first, second = (mine, base) if switched[i] else (base, mine)
        prompts.append(pairwise_messages(spec, instructions[i]["instruction"], first, second))
    shown: dict[int, tuple[float, Any]] = {}
    if getattr(judge, "kind", "") == "hf":
        annotator = f"{spec.name}(hf:{judge.model})"
        for i, (pref, raw) in zip(todo, _hf_preferences(judge, spec, prompts)):
            shown[i] = (pref, raw)
    else:
        annotator = spec.name if model == spec.model else f"{spec.name}({model})"
        replies = judge.chat([{"model": model, "messages": m, **spec.request} for m in prompts])
        for i, reply in zip(todo, replies):
            raw = reply.choice if spec.completion_key == "completions_all" else reply.text
            shown[i] = (parse_completion(spec, reply.text, reply.choice), raw if not reply.failed else reply.error)
    annotations = []
    for i, (base, mine) in enumerate(zip(instructions, model_outputs)):
        if i in shown:
            pref, raw = shown[i]
            # alpaca_eval's switch processor maps a switched preference back with 3 - x.
            preference = 3.0 - pref if switched[i] and not math.isnan(pref) else pref
        else:
            preference, raw = 1.5, None
        annotations.append(
            {
                "instruction": base["instruction"],
                "output_1": base["output"],
                "generator_1": base.get("generator", "baseline"),
                "dataset": base.get("dataset", "alpaca_eval"),
                "output_2": mine["output"],
                "generator_2": mine["generator"],
                "annotator": annotator,
                "preference": preference,
                "is_swapped": switched[i],
                "raw_completion": raw,
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


def leaderboard_df_gamed() -> str | None:
    """alpaca_eval's `df_gamed.csv` fetched the way alpaca_eval fetches it (hub dataset tatsu-lab/alpaca_eval),
    or None when offline or unreachable (the caller then fits the minimal GLM and names it so)."""
    from evals.official import is_offline

    if is_offline():
        return None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id="tatsu-lab/alpaca_eval", filename="df_gamed.csv", repo_type="dataset")
    except Exception as exc:  # noqa: BLE001 - any failure means: no leaderboard GLM, say so, go on
        log.warning("could not fetch alpaca_eval's df_gamed.csv (%s); set eval.lc_glm_df_gamed for the "
                    "leaderboard's length_controlled_v1 GLM", exc)
        return None


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
    this model, else `length_controlled_v1` with `df_gamed`, else `length_controlled_minimal`; None (with
    `lc_method` "none") when no fit can be made.
    """
    from alpaca_eval.metrics import get_winrate

    df = _annotation_frame(annotations)
    if df["generator_2"].nunique() != 1:
        raise ValueError(f"annotations hold several models: {sorted(df['generator_2'].unique())}")
    valid = df[df["preference"].notna()]
    failures = len(df) - len(valid)
    if valid.empty:
        raise ValueError("no annotation has a preference; every judgment was unparseable")
    head = get_winrate(df)  # drops unparseable rows itself, as in alpaca_eval's own evaluation
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
        # Fitted on the parseable rows, predicted over all rows (alpaca_eval's get_length_controlled_winrate).
        fitted, fitted_se = _lc_with_glm(df, glm, df_gamed)
        # All weights regularised to zero predict exactly 50%: the fit found nothing, which is not a 50% win rate.
        if math.isfinite(fitted) and abs(fitted - 50.0) > 1e-6:
            lc, method = fitted, glm
            # The "standard error" is the spread of the predictions over instructions; the minimal GLM has no
            # instruction term, so its spread is rounding noise, not an uncertainty.
            lc_se = fitted_se if glm != "length_controlled_minimal" else None
        else:
            log.warning("the length-controlled GLM fit is degenerate (every weight zero, a flat 50%); no LC win rate")
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
