"""Pluggable LLM judges: any OpenAI-compatible chat-completions endpoint, or a local transformers model.

A judge turns chat prompts (lists of {role, content} messages) into completions. Both kinds share an
on-disk cache keyed by (judge model, prompt), so rerunning an evaluation costs no requests, and both count
what they did in `JudgeStats`.

The `openai` judge sends requests from a bounded thread pool (`max_concurrency`), with a timeout, and
retries 429, 5xx, timeouts and connection errors with exponential backoff and full jitter (honouring a
`Retry-After` header up to the backoff cap). Other 4xx answers (a wrong key, an unknown model) are not
retried: they raise `JudgeError` at once. The API key is sent in the Authorization header only and never
logged.

The `hf` judge generates greedily with the local model. It can also start its reply with a `prefill`
(e.g. "Rating: [[") because a small local model rarely follows the output format otherwise; an API
judge gets no prefill (chat-completions has none) and answers in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orpo.errors import OrpoError

log = logging.getLogger(__name__)

Message = dict[str, str]
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(OrpoError, RuntimeError):
    """A judge request that failed for good (retries exhausted)."""


class JudgeRejected(JudgeError):
    """The endpoint refused the request (4xx other than 429): wrong key, model or URL. Never retried."""


@dataclass
class JudgeStats:
    """What a judge did: requests sent (retries included), retries, cache hits, failed prompts."""

    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "cache_hits": self.cache_hits,
                "failures": self.failures}


class JudgeCache:
    """One JSON file per (judge model, prompt) key under `root`; written atomically (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(model: str, messages: Sequence[Message], prefill: str | None = None) -> str:
        payload = {"model": model, "messages": list(messages)}
        if prefill:
            payload["prefill"] = prefill
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["completion"]
        except (json.JSONDecodeError, KeyError):
            log.warning("ignoring a corrupt judge cache entry %s", path)
            return None

    def put(self, key: str, completion: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({"completion": completion}, out, ensure_ascii=False)
        os.replace(tmp, path)


class Judge(Protocol):
    kind: str
    model: str
    stats: JudgeStats

    def complete(self, prompts: Sequence[Sequence[Message]], *, prefill: str | None = None) -> list[str | None]:
        """A completion per prompt (None where the request failed for good)."""
        ...


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2**attempt)))


class OpenAIJudge:
    """A judge behind any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, TGI, ...)."""

    kind = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        max_concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_tokens: int = 512,
        cache_dir: str | Path | None = None,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stats = JudgeStats()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        with self._rng_lock:
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s, self._rng)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_cap_s))
            except ValueError:
                pass  # an HTTP date; the jittered backoff is good enough
        return delay

    def _request(self, client, messages: Sequence[Message]) -> str:
        import httpx

        body = {"model": self.model, "messages": list(messages), "temperature": 0.0, "max_tokens": self.max_tokens}
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            retry_after = None
            try:
                response = client.post(f"{self.base_url}/chat/completions", json=body, headers=headers)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last_error = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise JudgeError(
                            f"{self.base_url}/chat/completions answered 200 without choices[0].message.content"
                        ) from exc
                if response.status_code not in RETRY_STATUS:
                    raise JudgeRejected(
                        f"{self.base_url}/chat/completions answered {response.status_code}: "
                        f"{response.text[:200]!r}; check judge.model, judge.base_url and the API key "
                        "environment variable (judge.api_key_env)"
                    )
                last_error = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.debug("judge request failed (%s); retry %d in %.2fs", last_error, attempt + 1, delay)
                time.sleep(delay)
        raise JudgeError(f"judge request failed {self.max_retries + 1} times; last error: {last_error}")

    def _one(self, client, messages: Sequence[Message]) -> str | None:
        key = JudgeCache.key(self.model, messages) if self.cache else None
        if self.cache and key:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.add(cache_hits=1)
                return cached
        try:
            completion = self._request(client, messages)
        except JudgeRejected:
            raise  # a configuration problem: every other prompt would fail the same way
        except JudgeError as exc:
            log.warning("judge gave up on a prompt: %s", exc)
            self.stats.add(failures=1)
            return None
        if self.cache and key:
            self.cache.put(key, completion)
        return completion

    def complete(self, prompts: Sequence[Sequence[Message]], *, prefill: str | None = None) -> list[str | None]:
        import httpx

        del prefill  # chat-completions has no assistant prefill; the judge answers in full
        with httpx.Client(timeout=self.timeout_s) as client, ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda messages: self._one(client, messages), prompts))


class HFJudge:
    """A local transformers model as judge (greedy); `score_options` compares answer options by likelihood."""

    kind = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        cache_dir: str | Path | None = None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.model = name
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.stats = JudgeStats()

    @classmethod
    def load(cls, spec: str, **kwargs: Any) -> HFJudge:
        """Load the judge model from a model spec (hub id, directory, models:/ URI, builtin:...)."""
        from orpo.config import ModelConfig
        from orpo.models import load_model_and_tokenizer

        from evals.run import default_device

        device = default_device()
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=spec), device_type=device)
        return cls(model.to(device).eval(), tokenizer, name=spec, **kwargs)

    def complete(self, prompts: Sequence[Sequence[Message]], *, prefill: str | None = None) -> list[str | None]:
        from evals.generate import generate, render_prompts

        results: list[str | None] = [None] * len(prompts)
        todo = []
        for index, messages in enumerate(prompts):
            cached = self.cache.get(JudgeCache.key(self.model, messages, prefill)) if self.cache else None
            if cached is not None:
                self.stats.add(cache_hits=1)
                results[index] = cached
            else:
                todo.append(index)
        if todo:
            if prefill:
                replies = self._generate_with_prefill([prompts[i] for i in todo], prefill, render_prompts)
            else:
                replies = [
                    r[0].text
                    for r in generate(
                        self._model,
                        self._tokenizer,
                        [prompts[i] for i in todo],
                        max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size,
                    )
                ]
            self.stats.add(requests=len(todo))
            for index, reply in zip(todo, replies):
                results[index] = reply
                if self.cache:
                    self.cache.put(JudgeCache.key(self.model, prompts[index], prefill), reply)
        return results

    def _generate_with_prefill(self, prompts, prefill: str, render_prompts) -> list[str]:
        """Greedy continuations of `prompt + prefill`; returned with the prefill in front."""
        import torch

        tokenizer = self._tokenizer
        prefill_ids = list(tokenizer(prefill, add_special_tokens=False)["input_ids"])
        rendered = [ids + prefill_ids for ids in render_prompts(tokenizer, prompts)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts = []
        for start in range(0, len(rendered), self.batch_size):
            batch = rendered[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            device = next(self._model.parameters()).device
            with torch.inference_mode():
                out = self._model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=min(self.max_new_tokens, 16),
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            for row in out[:, width:]:
                texts.append(prefill + tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def score_options(self, prompts: Sequence[Sequence[Message]], options: Sequence[str]) -> list[list[float]]:
        """Per prompt, the probability of each option as the start of the reply (normalised over options).

        Each option is scored by the summed log-probability of its tokens right after the generation
        prompt; like alpaca_eval's logprob parser, this turns a judge's preference into a probability.
        """
        import torch

        from evals.generate import render_prompts

        tokenizer = self._tokenizer
        option_ids = [list(tokenizer(option, add_special_tokens=False)["input_ids"]) for option in options]
        prompt_ids = render_prompts(tokenizer, prompts)
        scores: list[list[float]] = []
        self._model.eval()
        device = next(self._model.parameters()).device
        for ids in prompt_ids:
            # The judge prompt (often >1k tokens) runs once; each option continues from its KV cache, and only
            # the option's own positions are projected onto the vocabulary.
            prefix = ids[:-1]
            with torch.inference_mode():
                cache = self._model(
                    input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1
                ).past_key_values
                totals = []
                for opt in option_ids:
                    continuation = torch.tensor([[ids[-1], *opt]], device=device)
                    logits = self._model(input_ids=continuation, past_key_values=cache, use_cache=True).logits
                    logps = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # row i predicts opt[i]
                    totals.append(sum(logps[i, token].item() for i, token in enumerate(opt)))
                    cache.crop(-len(continuation[0]))  # drop this option before the next one
            probs = torch.softmax(torch.tensor(totals), dim=0).tolist()
            scores.append(probs)
        self.stats.add(requests=len(prompt_ids))
        return scores


def build_judge(config, *, api_key: str | None = None, cache_dir: str | Path | None = None) -> Judge:
    """The judge a `JudgeConfig` describes. For `openai`, the key is `api_key` or the env var it names."""
    cache = cache_dir if cache_dir is not None else config.cache_dir
    if config.kind == "openai":
        if not config.base_url:
            raise ValueError("eval.judge.base_url is required for the openai judge (e.g. https://api.openai.com/v1)")
        key = api_key if api_key is not None else os.environ.get(config.api_key_env)
        if not key:
            log.warning("no API key for the judge (environment variable %s is unset)", config.api_key_env)
        return OpenAIJudge(
            base_url=config.base_url,
            model=config.model,
            api_key=key,
            max_concurrency=config.max_concurrency,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            max_tokens=config.max_new_tokens,
            cache_dir=cache,
        )
    return HFJudge.load(config.model, max_new_tokens=config.max_new_tokens, cache_dir=cache)
