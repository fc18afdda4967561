"""Diversity metrics on strings whose values are known by hand."""

from __future__ import annotations

import pytest

from evals.diversity import distinct_n, diversity_scores, sample_and_score, self_bleu


def test_distinct_n_by_hand():
    # words: a b a b | a c  -> unigrams {a, b, c} of 6; bigrams ab ba ab ac -> {ab, ba, ac} of 4
    assert distinct_n(["a b a b", "a c"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["a b a b", "a c"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["", ""], 1) == 0.0


def test_self_bleu_extremes():
    same = ["the cat sat on the mat today"] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert self_bleu(disjoint) == pytest.approx(0.0, abs=1e-6)
    partial = self_bleu(["the cat sat on the mat", "the cat sat on a rug"])
    assert 0.0 < partial < 1.0


def test_diversity_scores_average_over_prompts():
    scores = diversity_scores([["x y", "x y"], ["p q", "r s"], ["only one"]])
    assert scores.n_prompts == 2 and scores.samples_per_prompt == 2
    assert scores.distinct_1 == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert scores.self_bleu == pytest.approx(0.5, abs=1e-6)  # 1.0 for identical, 0 for disjoint


def test_sample_and_score_on_tiny_model(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    scores, samples = sample_and_score(model, tokenizer, ["Say something.", "Two plus two?"], samples=3,
                                       temperature=1.0, max_new_tokens=8, batch_size=4)
    assert [len(s) for s in samples] == [3, 3]
    assert 0.0 <= scores.self_bleu <= 1.0 and 0.0 <= scores.distinct_1 <= 1.0
