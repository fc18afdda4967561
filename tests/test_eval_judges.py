"""Judges: the openai judge against a flaky loopback chat-completions server, the hf judge on a tiny model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_judge_server import JudgeServer, answer_for  # noqa: E402

from evals.judges import HFJudge, JudgeCache, JudgeError, JudgeRejected, OpenAIJudge, backoff_delay  # noqa: E402

SECRET = "sk-test-do-not-log"


# A prompt ending in digit i fails its first attempts with these statuses: question 0 once with 429,
# question 1 with 429 then 500, question 2 never (by i % 3).
FAILURES = ((429,), (429, 500), ())


def _planned(content, attempt):
    planned = FAILURES[int(content[-1]) % 3] if content[-1].isdigit() else ()
    return planned[attempt] if attempt < len(planned) else None


def _Server(status_always=None):
    return JudgeServer(faults=(lambda content, attempt: status_always) if status_always else _planned)


def _judge(url, tmp_path, **kwargs):
    options = {"base_url": url, "model": "judge-x", "api_key": SECRET, "max_concurrency": 3, "timeout_s": 5,
               "max_retries": 6, "cache_dir": tmp_path / "cache", "backoff_base_s": 0.001, "backoff_cap_s": 0.01}
    options.update(kwargs)
    return OpenAIJudge(**options)


def test_openai_judge_retries_flaky_server_then_hits_cache(tmp_path, caplog):
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(9)]
    caplog.set_level(logging.DEBUG)
    with _Server() as server:
        judge = _judge(server.url, tmp_path)
        first = judge.complete(prompts)
        assert first == [answer_for({"messages": p})["message"]["content"] for p in prompts]
        failed = len(server.bodies) - 9
        assert failed == 3 * 1 + 3 * 2  # the planned 429/500 answers, each retried
        assert judge.stats.retries == failed
        assert judge.stats.requests == len(server.bodies)
        assert judge.stats.failures == 0 and judge.stats.cache_hits == 0
        assert set(server.auth) == {f"Bearer {SECRET}"}
        calls_before = len(server.bodies)
        again = _judge(server.url, tmp_path)  # a new run, same cache directory
        assert again.complete(prompts) == first
        assert len(server.bodies) == calls_before
        assert again.stats.cache_hits == 9 and again.stats.requests == 0
    assert SECRET not in caplog.text and SECRET not in repr(judge)


def test_openai_judge_gives_up_after_max_retries_and_counts_failure(tmp_path):
    with _Server(status_always=503) as server:
        judge = _judge(server.url, tmp_path, max_retries=2, cache_dir=None)
        [reply] = judge.chat([{"messages": [{"role": "user", "content": "q"}]}], check=False)
        assert reply.failed and "gave up after 3 attempts" in reply.error and "HTTP 503" in reply.error
        assert len(server.bodies) == 3
        assert judge.stats.failures == 1 and judge.stats.retries == 2
        with pytest.raises(JudgeError, match="1 of 1 judge requests"):  # over judge.max_failure_fraction
            judge.complete([[{"role": "user", "content": "q"}]])


def test_openai_judge_does_not_retry_auth_errors(tmp_path):
    with _Server(status_always=401) as server:
        judge = _judge(server.url, tmp_path, cache_dir=None)
        with pytest.raises(JudgeRejected, match="401"):
            judge.complete([[{"role": "user", "content": "q"}]])
        assert len(server.bodies) == 1


def test_backoff_grows_exponentially_and_is_capped():
    import random

    rng = random.Random(0)
    draws = [[backoff_delay(attempt, 1.0, 8.0, rng) for _ in range(200)] for attempt in range(6)]
    assert max(draws[0]) <= 1.0 and max(draws[2]) <= 4.0 and max(draws[5]) <= 8.0
    assert max(draws[2]) > 2.0  # jitter spreads over the whole window


def test_cache_key_depends_on_every_request_field():
    body = {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    assert JudgeCache.key(body) == JudgeCache.key(dict(reversed(list(body.items()))))
    assert JudgeCache.key(body) != JudgeCache.key({**body, "model": "b"})
    assert JudgeCache.key(body) != JudgeCache.key({**body, "max_tokens": 6})
    assert JudgeCache.key(body) != JudgeCache.key({**body, "messages": [{"role": "user", "content": "y"}]})


def test_hf_judge_on_tiny_model(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    judge = HFJudge(model, tokenizer, name="tiny", max_new_tokens=6, cache_dir=tmp_path / "cache")
    prompts = [[{"role": "user", "content": "Rate this answer."}], [{"role": "user", "content": "Two plus two?"}]]
    completions = judge.complete(prompts)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    prefilled = judge.complete(prompts, prefill="Rating: [[")
    assert all(c.startswith("Rating: [[") for c in prefilled)
    assert judge.stats.requests == 4
    assert judge.complete(prompts) == completions and judge.stats.cache_hits == 2
    probabilities = judge.score_options(prompts, ["Output (a)", "Output (b)"])
    for pair in probabilities:
        assert len(pair) == 2 and sum(pair) == pytest.approx(1.0) and all(0 < p < 1 for p in pair)


def test_hf_option_scores_equal_a_full_forward_of_each_option(tiny_model_and_tokenizer, tmp_path):
    """The KV-cache shortcut scores exactly what scoring prompt+option in one full forward would."""
    import torch

    from evals.generate import render_prompts

    model, tokenizer = tiny_model_and_tokenizer
    judge = HFJudge(model, tokenizer, name="tiny", max_new_tokens=6, cache_dir=tmp_path / "cache")
    prompts = [[{"role": "user", "content": "Which is better, (a) Paris or (b) paris?"}],
               [{"role": "user", "content": "Two plus two?"}]]
    options = ["Output (a)", "Output (b)"]
    got = judge.score_options(prompts, options)

    expected = []
    for ids in render_prompts(tokenizer, prompts):
        totals = []
        for option in options:
            opt = tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logps = torch.log_softmax(model(input_ids=torch.tensor([ids + opt])).logits[0].float(), dim=-1)
            totals.append(sum(logps[len(ids) - 1 + i, t].item() for i, t in enumerate(opt)))
        expected.append(torch.softmax(torch.tensor(totals), dim=0).tolist())
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-5)
