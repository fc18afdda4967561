"""AlpacaEval metrics: the official leaderboard rows reproduced, order randomization, offline LC GLM."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from evals.alpaca import (
    _package_leaderboard,
    alpaca_metrics,
    judge_pairwise,
    load_evaluator,
    parse_completion,
    switched_orders,
)
from evals.judges import JudgeReply
from evals.cli import app

ANNOTATED = ["alpaca-7b", "Qwen-14B-Chat"]


def _leaderboard(shared_data):
    with open(shared_data / "alpaca_eval" / "leaderboard_rows.csv", encoding="utf-8") as handle:
        return {row[""]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("model", ANNOTATED)
def test_cli_reproduces_leaderboard_row(shared_data, model):
    row = _leaderboard(shared_data)[model]
    annotations = shared_data / "alpaca_eval" / "annotations" / f"{model}.json"
    weights = shared_data / "alpaca_eval" / "lc_glm_weights_baseline_gpt4_1106_preview.csv"
    result = CliRunner().invoke(
        app, ["alpaca-metrics", "--annotations", str(annotations), "--glm-weights", str(weights)]
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    for key in ("win_rate", "standard_error", "discrete_win_rate"):
        assert got[key] == pytest.approx(float(row[key]), abs=1e-9), key
    for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert got[key] == int(row[key]), key
    # Upstream measures avg_length on the outputs file, we on the annotations' output_2: a few chars apart.
    assert got["avg_length"] == pytest.approx(float(row["avg_length"]), abs=5)
    # LC from the published GLM weights with the difficulty distribution recovered from the other models.
    assert got["lc_method"].startswith("glm_weights")
    assert got["length_controlled_winrate"] == pytest.approx(float(row["length_controlled_winrate"]), abs=0.05)


def test_lc_weights_exclude_the_model_itself(shared_data):
    """The held-out model's own leaderboard LC must not be an input: corrupt it and the answer stays put."""
    import pandas as pd

    from evals.alpaca import lc_from_glm_weights

    weights = shared_data / "alpaca_eval" / "lc_glm_weights_baseline_gpt4_1106_preview.csv"
    board = pd.read_csv(_package_leaderboard(), index_col=0)
    honest = lc_from_glm_weights("alpaca-7b", weights, _package_leaderboard())
    board.loc["alpaca-7b", "length_controlled_winrate"] = 99.0
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as tmp:
        board.to_csv(tmp.name)
    assert lc_from_glm_weights("alpaca-7b", weights, tmp.name) == pytest.approx(honest, abs=1e-9)
    assert lc_from_glm_weights("no-such-model", weights) is None


def test_minimal_glm_runs_offline_and_writes_nothing_to_site_packages(shared_data, monkeypatch):
    from pathlib import Path

    import alpaca_eval
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be contacted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    weights_dir = Path(alpaca_eval.__file__).parent / "metrics" / "weights"
    existed = weights_dir.exists()
    annotations = json.loads((shared_data / "alpaca_eval" / "annotations" / "alpaca-7b.json").read_text())
    result = alpaca_metrics(annotations)
    assert result.lc_method == "length_controlled_minimal"
    assert 0.0 < result.length_controlled_winrate < 100.0 and result.length_controlled_winrate != 50.0
    assert result.lc_standard_error is None  # no instruction term: its prediction spread is rounding noise
    assert weights_dir.exists() == existed
    # Preferences unrelated to length: every weight regularised to zero would read as a flat 50; no LC instead.
    import random

    rng = random.Random(0)
    for annotation in annotations:
        annotation["preference"] = rng.choice([1.0, 2.0])
    noise = alpaca_metrics(annotations)
    assert noise.length_controlled_winrate is None and noise.lc_method == "none"


def _choice(first: float, second: float, token: str = "m") -> dict:
    """A chat-completions choice whose top logprobs give the two identifiers these probabilities."""
    tops = [{"token": "m", "logprob": math.log(first)}, {"token": "M", "logprob": math.log(second)}]
    return {"index": 0, "message": {"role": "assistant", "content": token},
            "logprobs": {"content": [{"token": token, "logprob": tops[0]["logprob"], "top_logprobs": tops}]}}


@pytest.mark.parametrize(
    "first, second, expected",
    [(0.9, 0.1, 1.1), (0.25, 0.75, 1.75), (0.5, 0.5, 1.5), (0.6, 0.2, 2 - 0.75)],
)
def test_logprob_preference_is_alpaca_evals(first, second, expected):
    evaluator = load_evaluator()
    assert parse_completion(evaluator, "m", _choice(first, second)) == pytest.approx(expected)


def test_unparseable_completions_are_nan():
    evaluator = load_evaluator()
    no_ids = _choice(0.5, 0.5)
    no_ids["logprobs"]["content"][0]["top_logprobs"] = [{"token": "Both", "logprob": -0.1}]
    assert math.isnan(parse_completion(evaluator, "Both", no_ids))
    assert math.isnan(parse_completion(evaluator, None, None))


def test_switched_orders_are_alpaca_evals_seeded_choice():
    from alpaca_eval.utils import random_seeded_choice

    instructions = [f"instruction {i}" for i in range(400)]
    orders = switched_orders(instructions, seed=0)
    assert orders == [random_seeded_choice("is_switched_outputs" + i + "0", [False, True]) for i in instructions]
    assert orders != switched_orders(instructions, seed=1)
    assert 150 < sum(orders) < 250


class _FirstPositionJudge:
    """Always prefers whatever is shown first: a maximally position-biased judge."""

    kind = "openai"
    model = "first"

    def __init__(self):
        self.requests = []

    def chat(self, requests, check=True):
        self.requests.extend(requests)
        return [JudgeReply(text="m", choice=_choice(0.99, 0.01)) for _ in requests]


def test_randomized_order_cancels_position_bias_and_is_recorded():
    rows = [{"instruction": f"q{i}", "output": f"base{i}", "generator": "base"} for i in range(40)]
    mine = [{"instruction": f"q{i}", "output": f"mine{i}", "generator": "me"} for i in range(40)]
    judge = _FirstPositionJudge()
    annotations = judge_pairwise(judge, rows, mine, seed=1)
    for annotation, request in zip(annotations, judge.requests):
        shown = request["messages"][-1]["content"]
        first_is_model = shown.index(annotation["output_2"]) < shown.index(annotation["output_1"])
        assert first_is_model == annotation["is_swapped"]
        # The first-shown output wins, mapped back to AlpacaEval's baseline=1 / model=2.
        assert annotation["preference"] == pytest.approx(1.99 if annotation["is_swapped"] else 1.01)
    swapped = sum(a["is_swapped"] for a in annotations)
    assert 0 < swapped < 40
    metrics = alpaca_metrics(annotations)
    assert metrics.n_wins == swapped and metrics.n_wins_base == 40 - swapped


def test_identical_outputs_are_ties_without_a_request():
    rows = [{"instruction": f"q{i}", "output": f"same{i}" if i < 2 else f"b{i}", "generator": "base"} for i in range(4)]
    mine = [{"instruction": f"q{i}", "output": f"same{i}" if i < 2 else f"m{i}", "generator": "me"} for i in range(4)]
    judge = _FirstPositionJudge()
    annotations = judge_pairwise(judge, rows, mine, seed=0)
    assert [a["preference"] for a in annotations[:2]] == [1.5, 1.5]
    assert len(judge.requests) == 2


def test_unparseable_judgments_are_counted_not_guessed():
    rows = [{"instruction": f"q{i}", "output": "b", "generator": "base"} for i in range(12)]
    mine = [{"instruction": f"q{i}", "output": "m", "generator": "me"} for i in range(12)]

    class Mumbler(_FirstPositionJudge):
        def chat(self, requests, check=True):
            return [JudgeReply(text="m", choice=_choice(0.9, 0.1)) if i % 3 else JudgeReply(text=None, error="x")
                    for i in range(len(requests))]

    annotations = judge_pairwise(Mumbler(), rows, mine, seed=0)
    assert sum(math.isnan(a["preference"]) for a in annotations) == 4
    metrics = alpaca_metrics(annotations)
    assert metrics.n_parse_failures == 4 and metrics.n_total == 8
    assert metrics.length_controlled_winrate is None and metrics.lc_method == "none"  # no LC from 8 rows
