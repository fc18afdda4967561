"""Reading raw preference data: local files (one file, a directory or a glob of JSONL/JSON/Parquet shards)
and hub datasets, streamed a record at a time, with the shards' content fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.data.ultrafeedback import MalformedRecordError
from orpo.errors import OrpoError
from orpo.handoffs import MANIFEST

if TYPE_CHECKING:
    from orpo.config import DataConfig

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
GLOB_CHARS = "*?["

# The (train, test) split names a hub dataset may ship, first match wins. A source with one of these pairs
# keeps its own split: HuggingFaceH4/ultrafeedback_binarized's test_prefs are public test prompts, and a hash
# re-split would train on some of them. Any other source (openbmb/UltraFeedback, the argilla set: only
# "train") has its "train" split divided by our hash of prompt_id (data.test_size).
SOURCE_SPLIT_PAIRS = (("train_prefs", "test_prefs"), ("train", "test"))


class DataPreparationError(OrpoError, RuntimeError):
    """Binarization cannot go on; the message says what to change."""


def is_glob(source: str) -> bool:
    return any(char in source for char in GLOB_CHARS)


def is_hub_id(source: str) -> bool:
    """A source that is not a local path or glob and looks like owner/name."""
    if is_glob(source) or Path(source).expanduser().exists():
        return False
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith(FILE_SUFFIXES)


def _is_data_file(path: Path, root: Path) -> bool:
    # Nothing under a hidden folder below the source (.ipynb_checkpoints holds older copies of shards).
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return path.is_file() and path.name.endswith(FILE_SUFFIXES) and not hidden and path.name != MANIFEST


def _glob_root(source: str) -> tuple[Path, str]:
    """(the fixed directory in front of the first wildcard, the pattern below it)."""
    parts = Path(source).expanduser().parts
    fixed = next(i for i, part in enumerate(parts) if is_glob(part))
    return Path(*parts[:fixed]) if fixed else Path("."), str(Path(*parts[fixed:]))


def input_files(source: str) -> list[Path]:
    """The local files a source names: the file itself, the data files under a directory, or those a glob
    matches (sorted by path, so a daily drop `2026-11-30.jsonl` comes after `2026-11-29.jsonl`)."""
    path = Path(source).expanduser()
    if is_glob(source):
        root, pattern = _glob_root(source)
        files = sorted(p for p in root.glob(pattern) if _is_data_file(p, root))
        if not files:
            raise DataPreparationError(f"data source {source!r} matches no {', '.join(FILE_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_data_file(p, path))
        if not files:
            raise DataPreparationError(f"{path} holds no {', '.join(FILE_SUFFIXES)} files")
        return files
    raise DataPreparationError(
        f"data source {source!r} is neither an existing file or directory nor a hub id (owner/name)"
    )


@dataclass(frozen=True)
class Shard:
    """One input file of a local source."""

    name: str  # relative to the source directory (or the glob's fixed part); "" for a single-file source
    path: Path
    size: int
    sha256: str


def list_shards(source: str) -> list[Shard]:
    """Every input file of a local source with its size and content hash."""
    path = Path(source).expanduser()
    root = _glob_root(source)[0] if is_glob(source) else path if path.is_dir() else None
    return [
        Shard(file.relative_to(root).as_posix() if root is not None else "", file, file.stat().st_size,
              file_sha256(file))
        for file in input_files(source)
    ]


def _hub_revision(source: str, revision: str | None) -> str:
    """The commit a hub revision points at, when the hub can be asked; else the revision as given."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(source, revision=revision).sha or (revision or "main")
    except Exception as exc:  # noqa: BLE001 - offline or unknown: the id and revision still identify it
        log.warning("could not resolve %s@%s on the hub (%s); fingerprinting the name", source, revision, exc)
        return revision or "main"


def input_fingerprint(cfg: DataConfig, shards: list[Shard] | None = None) -> str:
    """sha256 of the input's bytes (file names too, for a directory), or of hub id + resolved revision."""
    digest = hashlib.sha256()
    if is_hub_id(cfg.source):
        digest.update(f"hub\x00{cfg.source}\x00{_hub_revision(cfg.source, cfg.source_revision)}".encode())
        return digest.hexdigest()
    for shard in shards if shards is not None else list_shards(cfg.source):
        digest.update(f"file\x00{shard.name}\x00{shard.size}\x00".encode())
        digest.update(shard.sha256.encode())
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    # readinto one reused buffer: a fresh multi-MB bytes object per read costs page faults, not just copies.
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with Path(path).open("rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class RawItem:
    """One input record, or the reason it could not be parsed, with where it came from."""

    location: str
    line: int  # 1-based line in a text file (relative to the chunk in worker processes); 0 when not a line
    data: Any
    error: tuple[str, str] | None  # (field, problem) when the record is not even valid JSON
    nbytes: int
    split: str | None = None  # "train"/"test" when the source's own split decides; None: our hash does


def _json_loads():
    try:
        import orjson

        return orjson.loads, (orjson.JSONDecodeError,)
    except ImportError:  # the standard library is ~2x slower on 1 GB, but correct
        return json.loads, (json.JSONDecodeError, UnicodeDecodeError)


_UTF8_BOM = b"\xef\xbb\xbf"


def iter_jsonl(path: Path, start: int = 0, end: int | None = None) -> Iterator[RawItem]:
    """Records of a JSON Lines file (optionally gzip), or of the byte range [start, end) of one.

    Line numbers count from `start` (so they are absolute when start is 0). Blank lines are not records.
    """
    import gzip

    loads, errors = _json_loads()
    handle = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb", buffering=1 << 20)  # noqa: SIM115
    with handle:
        if start:
            handle.seek(start)
        remaining = None if end is None else end - start
        for line_number, line in enumerate(handle, 1):
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= len(line)
            if line_number == 1 and not start and line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM):]  # json.loads reads through it, orjson refuses it
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                yield RawItem(location, line_number, loads(line), None, len(line))
            except errors as exc:
                yield RawItem(location, line_number, None, ("(json)", f"not valid JSON ({exc})"), len(line))


def _count_lines(path: Path, start: int, end: int) -> int:
    """Lines in a byte range that starts at a line start (a last line without newline counts too)."""
    count = 0
    last = b"\n"
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            size = handle.readinto(view[: min(remaining, len(buffer))])
            if not size:
                break
            count += buffer.count(b"\n", 0, size)
            last = bytes(buffer[size - 1 : size])
            remaining -= size
    return count + (last != b"\n")


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[RawItem]:
    """Stream the elements of a JSON array file without loading it whole; JSONL content is also accepted.

    A syntax error inside an array cannot be skipped (the rest of the file has no reliable boundaries),
    so it always raises, naming the line. (pyarrow's JSON reader reads newline-delimited JSON only, and
    `json.load` holds the whole array in memory; this loop feeds the standard decoder one element at a time.)
    """
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not JSON
        buffer = handle.read(chunk_chars)
        eof = not buffer
        pos = _skip_ws(buffer, 0)
        if pos >= len(buffer) or buffer[pos] != "[":
            yield from iter_jsonl(path)
            return
        pos += 1
        line = 1 + buffer.count("\n", 0, pos)
        index = 0
        expect_value = True
        while True:
            start = pos
            pos = _skip_ws(buffer, pos)
            line += buffer.count("\n", start, pos)
            if pos >= len(buffer) and not eof:
                buffer, pos, eof = _refill(handle, buffer, pos, chunk_chars)
                continue
            if pos >= len(buffer):
                raise MalformedRecordError(f"{path}:{line}", "(json)", "the JSON array is not closed with ]")
            char = buffer[pos]
            if char == "]" and (not expect_value or index == 0):
                return
            if not expect_value:
                if char != ",":
                    raise MalformedRecordError(f"{path}:{line}", "(json)", f"expected , or ] after element {index - 1}")
                pos += 1
                expect_value = True
                continue
            try:
                obj, end = decoder.raw_decode(buffer, pos)
                complete = end < len(buffer) or eof
            except json.JSONDecodeError as exc:
                if eof:
                    raise MalformedRecordError(
                        f"{path}:{line + buffer.count(chr(10), pos, exc.pos)}", "(json)",
                        f"not valid JSON ({exc.msg}); a JSON array cannot be skipped past a syntax error, "
                        "convert it to JSONL to skip bad lines",
                    ) from None
                complete = False
            if not complete:
                buffer, pos, eof = _refill(handle, buffer, pos, chunk_chars)
                continue
            yield RawItem(f"{path}:{line} [element {index}]", line, obj, None, end - pos)
            line += buffer.count("\n", pos, end)
            pos = end
            index += 1
            expect_value = False


def _skip_ws(buffer: str, pos: int) -> int:
    while pos < len(buffer) and buffer[pos] in " \t\r\n":
        pos += 1
    return pos


def _refill(handle, buffer: str, pos: int, chunk_chars: int) -> tuple[str, int, bool]:
    """Drop what was consumed and read more; a value longer than the buffer doubles the read."""
    rest = buffer[pos:]
    more = handle.read(max(chunk_chars, len(rest)))
    return rest + more, 0, not more


def iter_parquet(path: Path, batch_rows: int = 512) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for data in batch.to_pylist():
            yield RawItem(f"{path} [row {row}]", 0, data, None, 0)
            row += 1


def iter_file(path: Path) -> Iterator[RawItem]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return iter_jsonl(path)
    if path.name.endswith(".json"):
        return iter_json_array(path)
    if path.name.endswith(".parquet"):
        return iter_parquet(path)
    raise DataPreparationError(f"{path}: unsupported file type; use {', '.join(FILE_SUFFIXES)}")


def splits_to_read(source: str, available: Iterable[str]) -> list[tuple[str, str | None]]:
    """(source split, the split its records go to: "train"/"test", or None for our hash) for each split read.

    A recognised pair (`SOURCE_SPLIT_PAIRS`) is read test first, so deduplication keeps a prompt found in both
    in the test split; otherwise "train" alone, re-split by hash.
    """
    names = set(available)
    for train, test in SOURCE_SPLIT_PAIRS:
        if train in names and test in names:
            return [(test, "test"), (train, "train")]
    if "train" in names:
        return [("train", None)]
    raise DataPreparationError(
        f"hub dataset {source!r} has no 'train' split (it has {', '.join(sorted(names)) or 'none'}); use a dataset "
        f"with 'train' or a train/test pair ({', '.join('/'.join(pair) for pair in SOURCE_SPLIT_PAIRS)})"
    )


def iter_hub(source: str, revision: str | None) -> Iterator[RawItem]:
    """Stream a hub dataset's records (never materialized whole), from the splits `splits_to_read` picks."""
    from datasets import load_dataset

    try:
        splits = load_dataset(source, revision=revision, streaming=True)  # every split, none read yet
    except Exception as exc:  # re-raised with what was tried
        raise DataPreparationError(
            f"data source {source!r} is not a local file or directory, and loading it as a hub dataset failed: {exc}"
        ) from exc
    for name, target in splits_to_read(source, splits.keys()):
        for index, data in enumerate(splits[name]):
            yield RawItem(f"{source}@{revision or 'main'} [{name} {index}]", 0, data, None, 0, target)


def _total_bytes(cfg: DataConfig, shards: list[Shard]) -> int | None:
    if is_hub_id(cfg.source):
        return None
    if any(not s.path.name.endswith((".jsonl", ".json")) for s in shards):
        return None  # compressed and parquet sizes do not match the decoded bytes we count
    return sum(s.size for s in shards)
