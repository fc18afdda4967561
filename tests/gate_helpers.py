"""Builders shared by the gate tests: a deterministic pairwise judge, and evaluation records in the
formats the evaluation writes (AlpacaEval outputs, FastChat judgments, per-pair preference margins).
No tests live here."""

from __future__ import annotations

import json
import re
from pathlib import Path


class LongerAnswerJudge:
    """Prefers the longer of the two outputs shown (the first on equal length), in whichever answer format
    the pairwise prompt asks for. `outputs` are the texts it may be shown, to locate them in the prompt."""

    kind = "openai"
    model = "longer-answer"

    def __init__(self, outputs):
        self.outputs = sorted(set(outputs), key=len, reverse=True)
        self.calls = 0

    def complete(self, prompts, prefill=None, **_):
        self.calls += len(prompts)
        return [self._choose(prompt[-1]["content"]) for prompt in prompts]

    def chat(self, requests, check=True):
        """Chat-completions replies as an endpoint sends them, with the top logprobs alpaca_eval parses."""
        from evals.judges import JudgeReply

        self.calls += len(requests)
        replies = []
        for request in requests:
            token = self._choose(request["messages"][-1]["content"])
            other = {"m": "M", "M": "m"}.get(token)
            top = [{"token": token, "logprob": 0.0}] + ([{"token": other, "logprob": -1000.0}] if other else [])
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": token},
                      "logprobs": {"content": [{"token": token, "logprob": 0.0, "top_logprobs": top}]}}
            replies.append(JudgeReply(token, choice))
        return replies

    def _choose(self, text):
        shown = []
        for output in self.outputs:  # longest first: a shorter output inside a longer one is skipped
            for match in re.finditer(re.escape(output), text):
                if not any(start <= match.start() < start + len(o) for start, o in shown):
                    shown.append((match.start(), output))
                    break
        (_, first), (_, second) = sorted(shown)[:2]
        first_wins = len(first) >= len(second)
        if "Output (a)" in text:
            return "Output (a)" if first_wins else "Output (b)"
        return "m" if first_wins else "M"


class NoJudge:
    kind = "openai"
    model = "none"

    def complete(self, prompts, prefill=None, **_):
        raise AssertionError("identical outputs must not reach the judge")

    def chat(self, requests, check=True):
        raise AssertionError("identical outputs must not reach the judge")


def outputs(generator, texts):
    return [{"instruction": f"Question {i}?", "output": t, "generator": generator, "dataset": "test"}
            for i, t in enumerate(texts)]


def short(i):
    return f"Reply {i}."


def long(i):
    return f"A longer, more careful reply number {i} with the reasoning spelled out."


def judgments(model, scores, judge="judge-x"):
    return [{"question_id": q, "model": model, "judge": [judge, "single-v1"], "turn": t, "score": s}
            for (q, t), s in scores.items()]


def margins(values):
    return [{"index": i, "pair_id": f"p{i}", "margin": m} for i, m in enumerate(values)]


def write_evaluation(report_dir: Path, alpaca=None, mt=None, pref=None) -> Path:
    """An evaluation directory with today's file names, holding what is given."""
    report_dir.mkdir(parents=True, exist_ok=True)
    if alpaca is not None:
        (report_dir / "model_outputs.json").write_text(json.dumps(alpaca))
    if mt is not None:
        (report_dir / "model_judgment.jsonl").write_text("".join(json.dumps(j) + "\n" for j in mt))
    if pref is not None:
        (report_dir / "preference_margins.json").write_text(json.dumps(pref))
    (report_dir / "report.json").write_text(json.dumps({"metrics": {}}))
    return report_dir
