"""Pluggable LLM judges: any OpenAI-compatible chat-completions endpoint, or a local transformers model.

The `openai` judge sends each request body as given (model, messages, temperature, max_tokens, logprobs,
top_logprobs, seed, ...) through the `openai` client library, from a bounded thread pool. It retries what
the SDK retries (408, 409, 429, every 5xx, timeouts, connection errors; `x-should-retry` obeyed;
`Retry-After`/`retry-after-ms` honoured up to the SDK's 60 s), and a 200 whose body has no
`choices[0].message` like a 5xx, with exponential backoff and full jitter (configurable, so tests wait
milliseconds). What cannot succeed is handled by its kind:

- 401/403/404 (a wrong key, model or URL) stop the run at once: every other item would fail the same way;
- any other 4xx (a content filter, a context-length error) or retries exhausted fail that item only: it is
  recorded like FastChat's `$ERROR$` and counted, and the batch fails only when more than
  `max_failure_fraction` of its items failed, naming the first errors;
- a judge that never answered (connection refused `down_after` times before any success) stops the run
  within seconds with one message naming its URL.

Every completion is cached on disk under a hash of the endpoint's URL and the whole request body, so changing
any setting never reuses old judgments, and another endpoint serving a model under the same name (a local
stand-in named gpt-4) never has its judgments served for the real judge's. The API key lives in the client only: it is never part of a cache key, a log line, a
repr or an error message.

The `hf` judge generates greedily with a local model, can start its reply with a `prefill` (a small model
rarely follows an output format otherwise) and scores answer options by likelihood (`score_options`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orpo.errors import OrpoError

log = logging.getLogger(__name__)

Message = dict[str, str]
API_ERROR_OUTPUT = "$ERROR$"  # FastChat's judgment text for a request that failed for good
FATAL_STATUS = {401, 403, 404}
MAX_RETRY_AFTER_S = 60.0  # the openai SDK does not wait longer than this for a Retry-After


class JudgeError(OrpoError, RuntimeError):
    """A judging batch that cannot give a result."""


class JudgeRejected(JudgeError):
    """The endpoint refused the configuration (401/403/404): wrong key, model or URL. Never retried."""


class JudgeUnavailable(JudgeError):
    """The endpoint cannot be reached at all."""


@dataclass
class JudgeReply:
    """One request's outcome: the completion text and its whole `choices[0]` (logprobs included), or an error."""

    text: str | None
    choice: dict[str, Any] | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.text is None


@dataclass
class JudgeStats:
    """What a judge did: requests sent (retries included), retries, cache hits, failed items."""

    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def fail(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.errors.append(error)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "cache_hits": self.cache_hits,
                "failures": self.failures}


class JudgeCache:
    """One JSON file per request under `root`, keyed by the hash of the whole request; written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        """Hash of every field of the request body (never the key: it is not in the body)."""
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("ignoring a corrupt judge cache entry %s", path)
            return None
        return record if isinstance(record, dict) else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(record, out, ensure_ascii=False)
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


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (numbers only, as the SDK reads them first)."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


class _Retry(Exception):
    """An attempt that may succeed when repeated."""

    def __init__(self, reason: str, wait: float | None = None, connection: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait
        self.connection = connection


class _ItemFailed(Exception):
    """An attempt that will fail however often it is repeated (this item only)."""


def check_failures(replies: Sequence[JudgeReply], max_failure_fraction: float, where: str) -> None:
    """Raise when more than `max_failure_fraction` of the items failed; the message names the first errors."""
    failed = [r for r in replies if r.failed]
    if failed and len(failed) > max_failure_fraction * len(replies):
        first = "; ".join(dict.fromkeys(str(r.error) for r in failed[:3]))
        raise JudgeError(
            f"{len(failed)} of {len(replies)} judge requests to {where} failed (more than "
            f"judge.max_failure_fraction={max_failure_fraction}); first errors: {first}"
        )


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
        max_failure_fraction: float = 0.05,
        down_after: int = 4,
        seed: int = 0,
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_failure_fraction = max_failure_fraction
        self.down_after = down_after
        self.stats = JudgeStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._successes = 0
        self._connection_failures = 0
        self._down = threading.Event()
        # Retries are ours (same rules as the SDK's, but a configurable backoff and per-item failures).
        # A placeholder key keeps the client constructible for endpoints that need none.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", max_retries=0,
                                     timeout=timeout_s)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _attempt(self, request: dict[str, Any]) -> dict[str, Any]:
        import openai

        try:
            raw = self._client.chat.completions.with_raw_response.create(**request)
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = f"HTTP {status}: {exc.response.text[:200]!r}"
            if status in FATAL_STATUS:
                raise JudgeRejected(
                    f"{self.url} answered {detail}; check eval.judge.model, eval.judge.base_url and the API key "
                    "environment variable (eval.judge.api_key_env)"
                ) from None
            wait = _retry_after(exc.response.headers)
            should = exc.response.headers.get("x-should-retry")
            retryable = should == "true" or (should != "false" and (status in (408, 409, 429) or status >= 500))
            if retryable and (wait is None or wait <= MAX_RETRY_AFTER_S):
                raise _Retry(detail, wait) from None
            raise _ItemFailed(detail) from None
        except openai.APITimeoutError:
            raise _Retry(f"timeout after {self.timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise _Retry(f"connection error ({type(cause).__name__}: {cause})", connection=True) from None
        try:
            body = json.loads(raw.http_response.text)
            choice = body["choices"][0]
            if not isinstance(choice["message"]["content"], str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Retry(f"HTTP 200 without choices[0].message.content ({type(exc).__name__})") from None
        return choice

    def _delay(self, attempt: int, wait: float | None) -> float:
        with self._lock:
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s, self._rng)
        return max(delay, wait) if wait is not None else delay

    def _unavailable(self, reason: str) -> JudgeUnavailable:
        return JudgeUnavailable(
            f"the judge at {self.url} cannot be reached ({reason}); start it, or fix eval.judge.base_url"
        )

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        reason = ""
        for attempt in range(self.max_retries + 1):
            if self._down.is_set():
                raise self._unavailable("no answer to the first requests")
            if attempt:
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            try:
                choice = self._attempt(request)
            except _Retry as retry:
                reason = retry.reason
                if retry.connection:
                    with self._lock:
                        self._connection_failures += 1
                        down = self._successes == 0 and self._connection_failures >= self.down_after
                    if down:
                        self._down.set()
                        raise self._unavailable(reason) from None
                if attempt < self.max_retries:
                    delay = self._delay(attempt, retry.wait)
                    log.debug("judge request failed (%s); retry %d in %.2fs", reason, attempt + 1, delay)
                    self._down.wait(delay)  # wakes at once when another worker finds the judge down
                continue
            with self._lock:
                self._successes += 1
            return choice
        raise _ItemFailed(f"gave up after {self.max_retries + 1} attempts; last error: {reason}")

    def _one(self, request: dict[str, Any]) -> JudgeReply:
        key = JudgeCache.key({"endpoint": self.url, "request": request}) if self.cache else None
        if self.cache and key:
            cached = self.cache.get(key)
            if cached is not None and isinstance(cached.get("choice"), dict):
                self.stats.add(cache_hits=1)
                return JudgeReply(text=cached["choice"]["message"]["content"], choice=cached["choice"])
        try:
            choice = self._request(request)
        except _ItemFailed as exc:
            log.warning("judge request failed for good: %s", exc)
            self.stats.fail(str(exc))
            return JudgeReply(text=None, error=str(exc))
        if self.cache and key:
            self.cache.put(key, {"choice": choice})
        return JudgeReply(text=choice["message"]["content"], choice=choice)

    def chat(self, requests: Sequence[dict[str, Any]], *, check: bool = True) -> list[JudgeReply]:
        """Send each request body (`model` defaults to the judge's); replies in order.

        With `check`, raises `JudgeError` when more than `max_failure_fraction` of the items failed.
        """
        bodies = [{"model": self.model, **request} for request in requests]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            futures = [pool.submit(self._one, body) for body in bodies]
            try:
                replies = [future.result() for future in futures]
            except JudgeError:
                self._down.set()  # the other workers stop at their next attempt instead of retrying on
                for future in futures:
                    future.cancel()
                raise
        if check:
            check_failures(replies, self.max_failure_fraction, self.url)
        return replies

    def complete(self, prompts: Sequence[Sequence[Message]], *, prefill: str | None = None) -> list[str | None]:
        """Plain greedy completions (temperature 0, `max_tokens`); None for an item that failed."""
        del prefill  # chat-completions has no assistant prefill; the judge answers in full
        replies = self.chat(
            [{"messages": list(m), "temperature": 0.0, "max_tokens": self.max_tokens} for m in prompts]
        )
        return [r.text for r in replies]


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

    def _key(self, messages: Sequence[Message], prefill: str | None) -> str:
        return JudgeCache.key({"model": self.model, "messages": list(messages), "prefill": prefill,
                               "max_new_tokens": self.max_new_tokens, "decoding": "greedy"})

    def complete(self, prompts: Sequence[Sequence[Message]], *, prefill: str | None = None) -> list[str | None]:
        from evals.generate import generate, render_prompts

        results: list[str | None] = [None] * len(prompts)
        todo = []
        for index, messages in enumerate(prompts):
            cached = self.cache.get(self._key(messages, prefill)) if self.cache else None
            if cached is not None and isinstance(cached.get("completion"), str):
                self.stats.add(cache_hits=1)
                results[index] = cached["completion"]
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
                    self.cache.put(self._key(prompts[index], prefill), {"completion": reply})
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


def build_judge(config, *, api_key: str | None = None, cache_dir: str | Path | None = None,
                model: str | None = None) -> Judge:
    """The judge a `JudgeConfig` describes (`model` overrides the endpoint model name).

    For `openai`, the key is `api_key` or the environment variable `config.api_key_env`.
    """
    cache = cache_dir if cache_dir is not None else config.cache_dir
    if config.kind == "openai":
        if not config.base_url:
            raise ValueError("eval.judge.base_url is required for the openai judge (e.g. https://api.openai.com/v1)")
        key = api_key if api_key is not None else os.environ.get(config.api_key_env)
        if not key:
            log.warning("no API key for the judge (environment variable %s is unset)", config.api_key_env)
        return OpenAIJudge(
            base_url=config.base_url,
            # Each protocol names its own model per request; this default only serves plain `complete` calls.
            model=model or config.alpaca_annotator_model,
            api_key=key,
            max_concurrency=config.max_concurrency,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            max_tokens=config.max_new_tokens,
            cache_dir=cache,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=config.backoff_cap_s,
            max_failure_fraction=config.max_failure_fraction,
            down_after=config.down_after,
        )
    return HFJudge.load(config.model, max_new_tokens=config.max_new_tokens, cache_dir=cache)
