"""Judges: the openai judge against a flaky loopback chat-completions server, the hf judge on a tiny model."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evals.judges import HFJudge, JudgeCache, JudgeRejected, OpenAIJudge, backoff_delay

SECRET = "sk-test-do-not-log"


class _Server:
    """A loopback chat-completions endpoint that fails some requests.

    A prompt ending in digit i fails its first attempts with the statuses FAILURES[i % 3]: question 0
    once with 429, question 1 with 429 then 500, question 2 never.
    """

    FAILURES = ((429,), (429, 500), ())

    def __init__(self, status_always=None):
        self.calls = 0
        self.attempts = {}
        self.auth = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls += 1
                    outer.auth.append(self.headers.get("Authorization"))
                    content = body["messages"][-1]["content"]
                    attempt = outer.attempts.get(content, 0)
                    outer.attempts[content] = attempt + 1
                planned = outer.FAILURES[int(content[-1]) % 3] if content[-1].isdigit() else ()
                status = status_always or (planned[attempt] if attempt < len(planned) else None)
                if status is not None and self.path.endswith("/chat/completions"):
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "try later"}')
                    return
                reply = "echo: " + body["messages"][-1]["content"]
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                           "model": body["model"]}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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
        assert first == [f"echo: question {i}" for i in range(9)]
        failed = server.calls - 9
        assert failed == 3 * 1 + 3 * 2  # the planned 429/500 answers, each retried
        assert judge.stats.retries == failed
        assert judge.stats.requests == server.calls
        assert judge.stats.failures == 0 and judge.stats.cache_hits == 0
        assert set(server.auth) == {f"Bearer {SECRET}"}
        calls_before = server.calls
        again = _judge(server.url, tmp_path)  # a new run, same cache directory
        assert again.complete(prompts) == first
        assert server.calls == calls_before
        assert again.stats.cache_hits == 9 and again.stats.requests == 0
    assert SECRET not in caplog.text and SECRET not in repr(judge)


def test_openai_judge_gives_up_after_max_retries_and_counts_failure(tmp_path):
    with _Server(status_always=503) as server:
        judge = _judge(server.url, tmp_path, max_retries=2, cache_dir=None)
        assert judge.complete([[{"role": "user", "content": "q"}]]) == [None]
        assert server.calls == 3
        assert judge.stats.failures == 1 and judge.stats.retries == 2


def test_openai_judge_does_not_retry_auth_errors(tmp_path):
    with _Server(status_always=401) as server:
        judge = _judge(server.url, tmp_path, cache_dir=None)
        with pytest.raises(JudgeRejected, match="401"):
            judge.complete([[{"role": "user", "content": "q"}]])
        assert server.calls == 1


def test_backoff_grows_exponentially_and_is_capped():
    import random

    rng = random.Random(0)
    draws = [[backoff_delay(attempt, 1.0, 8.0, rng) for _ in range(200)] for attempt in range(6)]
    assert max(draws[0]) <= 1.0 and max(draws[2]) <= 4.0 and max(draws[5]) <= 8.0
    assert max(draws[2]) > 2.0  # jitter spreads over the whole window


def test_cache_key_depends_on_model_and_prompt():
    messages = [{"role": "user", "content": "x"}]
    assert JudgeCache.key("a", messages) == JudgeCache.key("a", list(messages))
    assert JudgeCache.key("a", messages) != JudgeCache.key("b", messages)
    assert JudgeCache.key("a", messages) != JudgeCache.key("a", [{"role": "user", "content": "y"}])


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
