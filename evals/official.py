"""The official evaluation data at pinned revisions: where it comes from, how it is cached, how it is recognised.

Each file is downloaded once from its public source (raw files of the upstream Git repositories at a fixed
commit), checked against its SHA-256 and kept under `<cache>/eval-data/`. A configured local path always
wins; a local file counts as official when its bytes hash to the pinned file's SHA-256 (the leaderboard
metric names are used only then). Offline and unconfigured, the run stops naming the file to download and
the config key that takes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orpo.data.readers import file_sha256
from orpo.errors import OrpoError

log = logging.getLogger(__name__)

FASTCHAT_REVISION = "0e6d3e4beaab66f4d3f93db72541a4abab8af28d"  # lm-sys/FastChat
ALPACA_EVAL_REVISION = "cd543a149df89434d8a54582c0151c0b945c3d20"  # tatsu-lab/alpaca_eval
_FASTCHAT = f"https://raw.githubusercontent.com/lm-sys/FastChat/{FASTCHAT_REVISION}/fastchat/llm_judge/data"
_ALPACA = f"https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/{ALPACA_EVAL_REVISION}"


class OfficialDataError(OrpoError, ValueError):
    """Official data that cannot be had; the message names the file and the config key."""


@dataclass(frozen=True)
class OfficialFile:
    name: str
    url: str
    sha256: str
    config_key: str


ALPACA_EVAL_BASELINE = OfficialFile(
    "alpaca_eval/gpt4_1106_preview_outputs.json",
    f"{_ALPACA}/results/gpt4_1106_preview/model_outputs.json",
    "83db546b872ddebee8965fd05fa48461ee3c32bc695c62fb57f2d214ff741ec4",
    "eval.alpaca_source",
)
MT_BENCH_QUESTIONS = OfficialFile(
    "mt_bench/question.jsonl",
    f"{_FASTCHAT}/mt_bench/question.jsonl",
    "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
    "eval.mt_bench_questions",
)
MT_BENCH_JUDGE_PROMPTS = OfficialFile(
    "mt_bench/judge_prompts.jsonl",
    f"{_FASTCHAT}/judge_prompts.jsonl",
    "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
    "eval.mt_bench_judge_prompts",
)
MT_BENCH_REFERENCES = OfficialFile(
    "mt_bench/reference_answer/gpt-4.jsonl",
    f"{_FASTCHAT}/mt_bench/reference_answer/gpt-4.jsonl",
    "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
    "eval.mt_bench_reference_answers",
)


def is_official(path: str | Path | None, official: OfficialFile) -> bool:
    """Whether a local file is byte for byte the pinned official file."""
    return path is not None and Path(path).is_file() and file_sha256(path) == official.sha256


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orpo-pipeline"


def is_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "ORPO_OFFLINE"))


def _missing(official: OfficialFile, why: str) -> OfficialDataError:
    return OfficialDataError(
        f"{official.name} is needed and {why}: download {official.url} and set {official.config_key}=PATH "
        "(a local path always wins)"
    )


def official_file(official: OfficialFile, cache_dir: str | Path | None = None) -> Path:
    """The official file from the cache, downloading it first when online."""
    target = Path(cache_dir or default_cache_dir()) / "eval-data" / official.name
    if target.is_file() and file_sha256(target) == official.sha256:
        return target
    if is_offline():
        raise _missing(official, "not cached and this run is offline (HF_HUB_OFFLINE/ORPO_OFFLINE)")
    import httpx

    log.info("downloading %s from %s", official.name, official.url)
    try:
        response = httpx.get(official.url, timeout=60.0, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise _missing(official, f"could not be downloaded ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(response.content).hexdigest() != official.sha256:
        raise _missing(official, "the download does not match the pinned SHA-256")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(handle, "wb") as out:
        out.write(response.content)
    os.replace(tmp, target)
    return target


def resolve(configured: str | None, official: OfficialFile, cache_dir: str | Path | None = None) -> str:
    """The configured source when there is one, else the cached official file."""
    return configured if configured else str(official_file(official, cache_dir))
