"""Raw preference data -> prompt/chosen/rejected pairs -> a saved DatasetDict with a manifest.

    from orpo.config import DataConfig
    from orpo.data import prepare_dataset
    prepared = prepare_dataset(DataConfig(source="data/samples/ultrafeedback_sample.jsonl"), "runs/data/demo")

One pass over the input, a batch of records at a time: read -> validate -> recipe -> decontaminate (these
three in worker processes for large JSONL files, results taken back in input order) -> length limit ->
dedupe -> split (the source's own train/test, `readers.SOURCE_SPLIT_PAIRS`, else by a hash of prompt_id) ->
append to an Arrow file per split. Only a few batches are in
memory at a time, so 64k raw records (about 1 GB of JSON) never sit in memory as Python objects.

Every input record lands in exactly one place: the train split, the test split, or one drop reason of the
manifest (`orpo.data.ultrafeedback.DROP_REASONS`); `prepare_dataset` checks that the counts add up.
The same input, recipe, options and seed give byte-identical files and the same fingerprint. The output is
built in a temporary sibling directory and renamed into place, so a crash never leaves half a dataset, and
a source that yields no pair at all is an error naming the drop reasons (unless `allow_empty`).
Reading (readers.py), the worker processes (pool.py) and the manifest (manifest.py) live next door.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.data.decontaminate import (
    DecontaminationFileError,
    Decontaminator,
    load_eval_prompts,
)
from orpo.data.manifest import (
    MANIFEST_NAME,
    PreparedDataset,
    build_manifest,
    count_pairs,
    empty_data_message,
    load_prepared,
    reusable,
)
from orpo.data.pool import WorkerPool, worker_count
from orpo.data.readers import (
    DataPreparationError,
    RawItem,
    Shard,
    _total_bytes,
    file_sha256,
    input_fingerprint,
    is_hub_id,
    iter_file,
    iter_hub,
    list_shards,
)
from orpo.data.ultrafeedback import (
    DECONTAMINATED,
    DUPLICATE,
    MALFORMED,
    TOO_LONG,
    Dropped,
    MalformedRecordError,
    Pair,
    binarize_record,
    is_binarized,
    normalize_binarized,
    parse_record,
)
from orpo.handoffs import write_manifest

if TYPE_CHECKING:
    from orpo.config import DataConfig

log = logging.getLogger(__name__)

# Bump when a change in this package changes the output for the same input and options.
FORMAT_VERSION = "orpo-binarize-3"
SPLITS = ("train", "test")
MAX_MALFORMED_EXAMPLES = 10
MAX_DECONTAMINATION_EXAMPLES = 10
MAX_DROP_EXAMPLES = 10  # per drop reason other than malformed and decontaminated (which have their own lists)
WRITE_BATCH_ROWS = 1000
# Local JSONL files this large are parsed by worker processes, in chunks of this size.
PARALLEL_MIN_BYTES = 64 << 20

# ----------------------------------------------------------------------------------------------------
# Fingerprints and keys


def _key_payload(cfg: DataConfig, input_fp: str, chat_template: str | None = None) -> dict[str, Any]:
    # `incremental` selects shards; which shards were read is in the input fingerprint already.
    options = cfg.model_dump(mode="json", exclude={"source", "output_dir", "incremental"})
    if cfg.decontaminate:
        for path in cfg.decontamination_files:
            if not Path(path).is_file():
                raise DecontaminationFileError(
                    f"decontamination file {path} does not exist; give MT-Bench question.jsonl or an AlpacaEval "
                    "json (data.decontamination_files / --decontamination-file), or turn decontamination off"
                )
        options["decontamination_file_sha256"] = [file_sha256(p) for p in cfg.decontamination_files]
    payload = {"format": FORMAT_VERSION, "input": input_fp, "options": options}
    if is_hub_id(cfg.source):
        # Hub sources with a train/test pair keep it (they were re-split by hash): not the datasets made before.
        payload["splits"] = "source-pairs"
    # model.chat_template changes what the length limits count (only then: no new key without limits or override).
    if chat_template and _limits_tokens(cfg):
        from orpo.chat_template import spec_digest

        payload["chat_template"] = spec_digest(chat_template)
    return payload


def _limits_tokens(cfg: DataConfig) -> bool:
    return cfg.max_prompt_tokens is not None or cfg.max_length is not None


def default_dataset_dir(
    cfg: DataConfig, workdir: str | Path, exclude_shards: Iterable[str] = (), chat_template: str | None = None
) -> Path:
    """Where a config's dataset lives: `data.output_dir`, else `<workdir>/data/<dataset_key>`."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path(workdir) / "data" / dataset_key(cfg, exclude_shards=exclude_shards, chat_template=chat_template)


def dataset_key(
    cfg: DataConfig,
    *,
    input_fp: str | None = None,
    exclude_shards: Iterable[str] = (),
    chat_template: str | None = None,
) -> str:
    """Hash of (input fingerprint, recipe, every option, seed, evaluation files, and `model.chat_template` when
    the length limits count tokens with it): the dataset's directory name.

    The source path itself and the output directory are left out: the same bytes under another name, or
    written elsewhere, make the same dataset. Shards left out (by content hash) are not part of the input.
    """
    if input_fp is None:
        input_fp = input_fingerprint(cfg, select_shards(cfg, exclude_shards)[0] if not is_hub_id(cfg.source) else None)
    payload = _key_payload(cfg, input_fp, chat_template)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def select_shards(cfg: DataConfig, exclude_shards: Iterable[str] = ()) -> tuple[list[Shard], list[Shard]]:
    """(the shards to read, the shards left out because their content hash is in `exclude_shards`)."""
    if is_hub_id(cfg.source):
        return [], []
    excluded = set(exclude_shards)
    shards = list_shards(cfg.source)
    return [s for s in shards if s.sha256 not in excluded], [s for s in shards if s.sha256 in excluded]


# ----------------------------------------------------------------------------------------------------
# Reading


# ----------------------------------------------------------------------------------------------------
# Writing


def output_features():
    """The output schema: HuggingFaceH4/ultrafeedback_binarized's columns plus source and models."""
    from datasets import Features, Value

    message = [{"content": Value("string"), "role": Value("string")}]
    return Features(
        {
            "prompt": Value("string"),
            "prompt_id": Value("string"),
            "chosen": message,
            "rejected": message,
            "score_chosen": Value("float64"),
            "score_rejected": Value("float64"),
            "source": Value("string"),
            "chosen_model": Value("string"),
            "rejected_model": Value("string"),
        }
    )


def is_test(prompt_id: str, test_size: float) -> bool:
    """The split of a prompt depends only on its id, so it never moves when other records come or go."""
    return int(prompt_id[:16], 16) < test_size * (1 << 64)


class _SplitWriter:
    """Appends pairs to an Arrow stream file in batches and hashes their content as it goes."""

    def __init__(self, path: Path, schema) -> None:
        import pyarrow as pa

        self.path = path
        self._pa = pa
        self._schema = schema
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._pairs: list[Pair] = []
        self.count = 0
        self.digest = hashlib.sha256()

    def add(self, pair: Pair, digest: bytes) -> None:
        self._pairs.append(pair)
        self.count += 1
        self.digest.update(digest)
        if len(self._pairs) >= WRITE_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._pairs:
            self._writer.write_batch(_record_batch(self._pa, self._schema, self._pairs))
            self._pairs = []

    def close(self) -> None:
        self.flush()
        if self.count == 0:  # datasets cannot load a split saved without any record batch
            self._writer.write_batch(_record_batch(self._pa, self._schema, []))
        self._writer.close()
        self._sink.close()


def _record_batch(pa, schema, pairs: list[Pair]):
    """Build the batch column by column (much faster than from_pylist on nested rows)."""
    n = len(pairs)
    roles = pa.array(["user", "assistant"] * n, type=pa.string())
    offsets = pa.array(range(0, 2 * n + 1, 2), type=pa.int32())

    def messages(column: str, responses: list[str]):
        interleaved = [text for pair, answer in zip(pairs, responses, strict=True) for text in (pair.prompt, answer)]
        contents = pa.array(interleaved, type=pa.string())
        list_type = schema.field(column).type
        struct = pa.StructArray.from_arrays([contents, roles], fields=list(list_type.value_type))
        return pa.ListArray.from_arrays(offsets, struct, type=list_type)

    columns = {
        "prompt": pa.array([p.prompt for p in pairs], type=pa.string()),
        "prompt_id": pa.array([p.prompt_id for p in pairs], type=pa.string()),
        "chosen": messages("chosen", [p.chosen for p in pairs]),
        "rejected": messages("rejected", [p.rejected for p in pairs]),
        "score_chosen": pa.array([p.score_chosen for p in pairs], type=pa.float64()),
        "score_rejected": pa.array([p.score_rejected for p in pairs], type=pa.float64()),
        "source": pa.array([p.source for p in pairs], type=pa.string()),
        "chosen_model": pa.array([p.chosen_model for p in pairs], type=pa.string()),
        "rejected_model": pa.array([p.rejected_model for p in pairs], type=pa.string()),
    }
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def pair_digest(pair: Pair) -> bytes:
    """sha256 of a library-independent encoding of a pair (length-prefixed UTF-8 fields, float64 scores).

    The output fingerprint hashes these digests in output order, so it depends on content and order only.
    """
    parts = []
    for value in (pair.prompt, pair.chosen, pair.rejected, pair.source, pair.chosen_model, pair.rejected_model):
        encoded = value.encode("utf-8")
        parts.append(struct.pack("<Q", len(encoded)))
        parts.append(encoded)
    parts.append(struct.pack("<dd", pair.score_chosen, pair.score_rejected))
    return hashlib.sha256(b"".join(parts)).digest()


_IRREGULAR_SPACE = re.compile(r"\s\s|[^\S ]|^\s|\s$")


def dedupe_key(prompt: str, prompt_id: str | None = None) -> bytes:
    """Prompts equal up to whitespace are the same prompt: sha256 of the whitespace-normalized prompt."""
    if prompt_id is not None and not _IRREGULAR_SPACE.search(prompt):
        return bytes.fromhex(prompt_id)  # already normalized, so its hash is the prompt_id
    return hashlib.sha256(" ".join(prompt.split()).encode("utf-8")).digest()


# ----------------------------------------------------------------------------------------------------
# Length limits


@dataclass(frozen=True)
class LengthLimit:
    """Drops pairs whose chat-formatted prompt or prompt+response is longer than the limits, in tokens."""

    tokenizer: Any
    max_prompt_tokens: int | None
    max_length: int | None
    template: str | None = None  # orpo.chat_template.training_template; None: the tokenizer's own (or fallback)

    def too_long(self, pairs: list[Pair]) -> list[bool]:
        if not pairs:
            return []
        users = [[{"role": "user", "content": p.prompt}] for p in pairs]
        prompt_texts = self._render(users, generation_prompt=True)
        texts = prompt_texts
        if self.max_length is not None:
            chosen = [u + [{"role": "assistant", "content": p.chosen}] for u, p in zip(users, pairs, strict=True)]
            rejected = [u + [{"role": "assistant", "content": p.rejected}] for u, p in zip(users, pairs, strict=True)]
            texts = prompt_texts + self._render(chosen) + self._render(rejected)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        n = len(pairs)
        flags = []
        for i in range(n):
            long_prompt = self.max_prompt_tokens is not None and lengths[i] > self.max_prompt_tokens
            long_pair = self.max_length is not None and max(lengths[n + i], lengths[2 * n + i]) > self.max_length
            flags.append(long_prompt or long_pair)
        return flags

    def _render(self, conversations: list[list[dict[str, str]]], generation_prompt: bool = False) -> list[str]:
        # The template training renders with (orpo.collate): model.chat_template when set; a tokenizer without
        # one gets the fallback's role tags and EOS-closed turns, which count against the limits too.
        from orpo.chat_template import template_of

        return self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=self.template or template_of(self.tokenizer),
        )


def tokenizer_identity(tokenizer: Any, template: str | None = None) -> str:
    """Name + a hash of the vocabulary and merges and of the chat template the lengths are counted with
    (`template`, else the tokenizer's own or the fallback), so a different tokenizer or template makes a
    different dataset."""
    from orpo.chat_template import template_of

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    template = hashlib.sha256((template or template_of(tokenizer)).encode()).hexdigest()[:16]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return f"{name}#{hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]}#template-{template}"
    return f"{name}#vocab{len(tokenizer)}#template-{template}"


def _resolve_tokenizer(cfg: DataConfig, tokenizer: Any) -> Any:
    if cfg.max_prompt_tokens is None and cfg.max_length is None:
        return None
    if tokenizer is not None:
        return tokenizer
    if cfg.tokenizer:
        from orpo.models import load_tokenizer, resolve_model

        return load_tokenizer(resolve_model(cfg.tokenizer).path)
    raise DataPreparationError(
        "data.max_prompt_tokens / data.max_length count tokens, so they need a tokenizer: set data.tokenizer "
        "(e.g. builtin:smollm2-135m-instruct or a hub id; --tokenizer on the CLI) or pass tokenizer=..."
    )


# ----------------------------------------------------------------------------------------------------
# The pass over the input


@dataclass(slots=True)
class Outcome:
    """What one input record became: a pair, or a drop reason (with the field/rule and detail)."""

    location: str
    line: int
    pair: Pair | None = None
    reason: str = ""
    field: str = ""  # malformed: the field; decontaminated: the rule (source, exact, ngram)
    detail: str = ""  # malformed: the problem; decontaminated: the evaluation prompt matched; else why
    non_numeric_ratings: int = 0
    non_numeric_overall: int = 0
    prebinarized: bool = False
    digest: bytes = b""  # pair_digest, computed where the pair is made (in the workers when there are any)
    dedupe_key: bytes = b""
    split: str | None = None  # the source's split ("train"/"test"); None: by hash of prompt_id


class RecordProcessor:
    """Validate -> recipe -> decontaminate, a batch of records at a time. Holds no per-run state, so it
    runs the same in this process or in worker processes (it is pickled to them once)."""

    def __init__(self, recipe: str, seed: int, fix_scores: bool, decontaminator: Decontaminator | None) -> None:
        self.recipe = recipe
        self.seed = seed
        self.fix_scores = fix_scores
        self.decontaminator = decontaminator

    def process(self, items: list[RawItem]) -> list[Outcome]:
        outcomes = [self._one(item) for item in items]
        if self.decontaminator is not None:
            paired = [o for o in outcomes if o.pair is not None]
            hits = self.decontaminator.check_many([o.pair.prompt for o in paired], [o.pair.source for o in paired])
            for outcome, hit in zip(paired, hits, strict=True):
                if hit is not None:
                    outcome.pair = None
                    outcome.reason, outcome.field, outcome.detail = DECONTAMINATED, hit.rule, hit.matched
        for outcome in outcomes:
            if outcome.pair is not None:
                outcome.digest = pair_digest(outcome.pair)
                outcome.dedupe_key = dedupe_key(outcome.pair.prompt, outcome.pair.prompt_id)
        return outcomes

    def _one(self, item: RawItem) -> Outcome:
        outcome = Outcome(item.location, item.line, split=item.split)
        if item.error is not None:
            outcome.reason, (outcome.field, outcome.detail) = MALFORMED, item.error
            return outcome
        data = item.data
        try:
            if type(data) is dict and is_binarized(data):
                outcome.prebinarized = True
                result = normalize_binarized(data, item.location)
            else:
                record = parse_record(data, item.location, require_overall_score=self.recipe == "h4")
                outcome.non_numeric_ratings = record.non_numeric_ratings
                outcome.non_numeric_overall = record.non_numeric_overall
                result = binarize_record(record, self.recipe, self.seed, fix_scores=self.fix_scores)
        except MalformedRecordError as exc:
            outcome.reason, outcome.field, outcome.detail = MALFORMED, exc.field, exc.problem
            return outcome
        if isinstance(result, Dropped):
            outcome.reason, outcome.detail = result.reason, result.detail
        else:
            outcome.pair = result
        return outcome


def _outcome_batches(
    cfg: DataConfig, processor: RecordProcessor, pool: WorkerPool | None, shards: list[Shard]
) -> Iterator[tuple[int, list[Outcome], int]]:
    """(shard index, outcomes, bytes read) in input order, from worker processes where a file is large enough."""
    if is_hub_id(cfg.source):
        sources = [iter_hub(cfg.source, cfg.source_revision)]
    else:
        sources = []
        for shard in shards:
            path = shard.path
            parallel = pool is not None and path.name.endswith(".jsonl") and shard.size >= PARALLEL_MIN_BYTES
            sources.append(pool.outcomes(path) if parallel else iter_file(path))
    for index, source in enumerate(sources):
        batch: list[RawItem] = []
        for entry in source:
            if isinstance(entry, tuple):  # already processed by a worker
                yield (index, *entry)
                continue
            batch.append(entry)
            if len(batch) >= WRITE_BATCH_ROWS:
                yield index, processor.process(batch), sum(item.nbytes for item in batch)
                batch = []
        if batch:
            yield index, processor.process(batch), sum(item.nbytes for item in batch)


@dataclass
class _Tally:
    records_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    malformed_examples: list[dict[str, str]] = field(default_factory=list)
    decontaminated: Counter = field(default_factory=Counter)
    decontamination_examples: list[dict[str, str]] = field(default_factory=list)
    drop_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # reason -> first few records
    non_numeric_ratings: int = 0
    non_numeric_overall_scores: int = 0
    prebinarized_records: int = 0
    shard_records: Counter = field(default_factory=Counter)  # shard index -> records read
    shard_pairs: Counter = field(default_factory=Counter)  # shard index -> pairs kept


class _Binarizer:
    """The ordered end of the pass: counts every outcome, then length limit, dedupe, split and write."""

    def __init__(
        self, cfg: DataConfig, staging: Path, length_limit: LengthLimit | None, decontaminator: Decontaminator | None
    ) -> None:
        self.cfg = cfg
        self.tally = _Tally()
        self.length_limit = length_limit
        self.decontaminator = decontaminator  # for the manifest; the filtering happens in RecordProcessor
        self.seen: set[bytes] = set()
        schema = output_features().arrow_schema
        self.writers = {split: _SplitWriter(staging / f"{split}.arrow", schema) for split in SPLITS}
        self._pending: list[tuple[int, Outcome]] = []

    def consume(self, outcomes: list[Outcome], shard: int = 0) -> None:
        tally = self.tally
        tally.shard_records[shard] += len(outcomes)
        for outcome in outcomes:
            tally.records_in += 1
            tally.non_numeric_ratings += outcome.non_numeric_ratings
            tally.non_numeric_overall_scores += outcome.non_numeric_overall
            tally.prebinarized_records += outcome.prebinarized
            if outcome.pair is not None:
                self._pending.append((shard, outcome))
                continue
            if outcome.reason == MALFORMED:
                if self.cfg.on_error == "fail":
                    raise MalformedRecordError(outcome.location, outcome.field, outcome.detail)
                if len(tally.malformed_examples) < MAX_MALFORMED_EXAMPLES:
                    tally.malformed_examples.append(
                        {"location": outcome.location, "field": outcome.field, "problem": outcome.detail}
                    )
            elif outcome.reason == DECONTAMINATED:
                tally.decontaminated[outcome.field] += 1
                if len(tally.decontamination_examples) < MAX_DECONTAMINATION_EXAMPLES:
                    tally.decontamination_examples.append(
                        {"location": outcome.location, "rule": outcome.field, "matched": outcome.detail}
                    )
            else:
                self._drop_example(outcome, outcome.reason)
            tally.dropped[outcome.reason] += 1
        if len(self._pending) >= WRITE_BATCH_ROWS:
            self.flush()

    def _drop_example(self, outcome: Outcome, reason: str) -> None:
        examples = self.tally.drop_examples.setdefault(reason, [])
        if len(examples) < MAX_DROP_EXAMPLES:
            examples.append({"location": outcome.location, "detail": outcome.detail})

    def flush(self) -> None:
        """Length-filter, dedupe and split the pending pairs, length first: a too long first copy of a
        prompt does not block a later one that fits."""
        pending, self._pending = self._pending, []
        pairs = [outcome.pair for _, outcome in pending]
        too_long = self.length_limit.too_long(pairs) if self.length_limit else [False] * len(pairs)
        for (shard, outcome), pair, long in zip(pending, pairs, too_long, strict=True):
            if long:
                self.tally.dropped[TOO_LONG] += 1
                self._drop_example(outcome, TOO_LONG)
                continue
            if self.cfg.dedupe:
                if outcome.dedupe_key in self.seen:
                    self.tally.dropped[DUPLICATE] += 1
                    self._drop_example(outcome, DUPLICATE)
                    continue
                self.seen.add(outcome.dedupe_key)
            split = outcome.split or ("test" if is_test(pair.prompt_id, self.cfg.test_size) else "train")
            self.writers[split].add(pair, outcome.digest)
            self.tally.shard_pairs[shard] += 1

    def close(self) -> None:
        self.flush()
        for writer in self.writers.values():
            writer.close()

    def output_fingerprint(self) -> str:
        digest = hashlib.sha256(FORMAT_VERSION.encode())
        for split in SPLITS:
            digest.update(f"\x00{split}\x00{self.writers[split].count}\x00".encode())
            digest.update(self.writers[split].digest.digest())
        return digest.hexdigest()


def _progress_bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="binarize", disable=not enabled, file=sys.stderr)


def _decontaminator(cfg: DataConfig) -> Decontaminator | None:
    if not cfg.decontaminate:
        return None
    eval_prompts = load_eval_prompts(cfg.decontamination_files)
    if not eval_prompts:
        log.warning("decontamination is on but no evaluation files are given: only dropping truthful_qa")
    return Decontaminator(eval_prompts, n=cfg.decontamination_ngram)


def _run_pass(
    cfg: DataConfig, staging: Path, length_limit: LengthLimit | None, progress: bool, workers: int | None,
    shards: list[Shard],
) -> _Binarizer:
    decontaminator = _decontaminator(cfg)
    processor = RecordProcessor(cfg.recipe, cfg.seed, cfg.fix_overall_score, decontaminator)
    binarizer = _Binarizer(cfg, staging, length_limit, decontaminator)
    count = worker_count(workers)
    pool = WorkerPool(processor, count) if count > 1 else None
    bar = _progress_bar(_total_bytes(cfg, shards), progress)
    try:
        for shard, outcomes, nbytes in _outcome_batches(cfg, processor, pool, shards):
            binarizer.consume(outcomes, shard)
            bar.update(nbytes)
            bar.set_postfix(records=binarizer.tally.records_in, refresh=False)
        binarizer.close()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return binarizer


# ----------------------------------------------------------------------------------------------------
# Saving, manifest, export


def _save_dataset_dict(staging: Path, target: Path, fingerprint: str) -> None:
    """Turn the staged Arrow files into a DatasetDict on disk (memory-mapped: nothing is loaded whole)."""
    import datasets
    from datasets import Dataset, DatasetDict, DatasetInfo
    from datasets.table import MemoryMappedTable

    features = output_features()
    splits = {}
    for split in SPLITS:
        table = MemoryMappedTable.from_file(str(staging / f"{split}.arrow"))
        info = DatasetInfo(features=features, description="UltraFeedback-style preference pairs (orpo-pipeline)")
        # An explicit fingerprint keeps state.json identical across runs (the default hashes temp paths).
        splits[split] = Dataset(table, info=info, split=datasets.NamedSplit(split),
                                fingerprint=f"{fingerprint[:16]}-{split}")
    was_enabled = datasets.utils.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        DatasetDict(splits).save_to_disk(str(target))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    for split in SPLITS:
        if splits[split].num_rows == 0:
            _add_empty_shard(staging / f"{split}.arrow", target / split)


def _add_empty_shard(staged: Path, split_dir: Path) -> None:
    """save_to_disk writes no data file for an empty split, and load_from_disk then fails on it: give the
    split one empty shard (the staged file holds the schema and an empty batch)."""
    state_path = split_dir / "state.json"
    state = json.loads(state_path.read_text(encoding="utf-8"))
    if state.get("_data_files"):
        return
    name = "data-00000-of-00001.arrow"
    shutil.copyfile(staged, split_dir / name)
    state["_data_files"] = [{"filename": name}]
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")


def _export(dataset_dir: Path, fmt: str) -> list[str]:
    """Also write each split as JSON Lines or Parquet under export/ (rows in dataset order)."""
    from datasets import load_from_disk

    export_dir = dataset_dir / "export"
    export_dir.mkdir()
    written = []
    dataset = load_from_disk(str(dataset_dir))
    for split in SPLITS:
        path = export_dir / f"{split}.{fmt}"
        if fmt == "parquet":
            dataset[split].to_parquet(str(path))
        else:
            with path.open("w", encoding="utf-8", newline="\n") as handle:
                for batch in dataset[split].iter(batch_size=WRITE_BATCH_ROWS):
                    for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
                        # An unknown score (a binarized row without one) is NaN, which JSON has not: null.
                        for score in ("score_chosen", "score_rejected"):
                            if row[score] != row[score]:
                                row[score] = None
                        handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        written.append(path.relative_to(dataset_dir).as_posix())
    return written


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished build into place; an old dataset there is replaced, anything else is refused."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file()
                                    and not (out_dir / "dataset_dict.json").is_file()):
            raise DataPreparationError(
                f"{out_dir} exists and is not a dataset directory; choose another --out / data.output_dir"
            )
        old = Path(tempfile.mkdtemp(prefix=out_dir.name + ".old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def prepare_dataset(
    cfg: DataConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    workers: int | None = None,
    allow_empty: bool = False,
    exclude_shards: Iterable[str] = (),
    chat_template: str | None = None,
) -> PreparedDataset:
    """Binarize `cfg.source` into `out_dir` (a DatasetDict + manifest.json), or reuse it if already there.

    `tokenizer` is used for the length limits; without it `cfg.tokenizer` is loaded. The result is
    reused when `out_dir` holds a complete dataset with the same key (input fingerprint, options, seed,
    evaluation files) and tokenizer. `workers` processes parse local JSONL files of 64 MB and more
    (default: the CPUs available, at most 4, or $ORPO_DATA_WORKERS; 1 = all in this process); the
    output does not depend on it. Shards whose content hash is in `exclude_shards` are left out (listed
    in the manifest as excluded). No pairs at all is an error naming the drop reasons, unless `allow_empty`;
    on any error nothing is left behind. `chat_template` is `model.chat_template`: the length limits count
    tokens with the template training will render (`orpo.chat_template.training_template`).
    """
    out_dir = Path(out_dir)
    shards, excluded = select_shards(cfg, exclude_shards)
    if excluded and not shards:
        raise DataPreparationError(
            f"every shard of {cfg.source} ({len(excluded)}) was seen before; no new data to prepare"
        )
    input_fp = input_fingerprint(cfg, shards if not is_hub_id(cfg.source) else None)
    key = dataset_key(cfg, input_fp=input_fp, chat_template=chat_template)
    tokenizer = _resolve_tokenizer(cfg, tokenizer)
    length_limit = None
    if tokenizer is not None:
        from orpo.chat_template import training_template

        template = training_template(tokenizer, chat_template)
        length_limit = LengthLimit(tokenizer, cfg.max_prompt_tokens, cfg.max_length, template)
    tokenizer_id = tokenizer_identity(tokenizer, length_limit.template) if length_limit is not None else None
    existing = reusable(out_dir, key, tokenizer_id)
    if existing is not None:
        log.info("reusing %s (same input and options, key %s)", out_dir, key)
        return existing
    # The directories this call creates, outermost last: a failed build removes them again (when empty).
    created = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A uniquely named sibling (not mkdtemp: its 0700 mode would survive the rename) on the same filesystem.
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        staging = tmp / "_staging"
        staging.mkdir()
        binarizer = _run_pass(cfg, staging, length_limit, progress, workers, shards)
        counts = count_pairs(binarizer.tally, {split: w.count for split, w in binarizer.writers.items()})
        if counts["pairs"] == 0 and not allow_empty:
            raise DataPreparationError(empty_data_message(cfg.source, counts, dict(binarizer.tally.dropped)))
        fingerprint = binarizer.output_fingerprint()
        _save_dataset_dict(staging, tmp, fingerprint)
        shutil.rmtree(staging)
        manifest = build_manifest(
            cfg, format_version=FORMAT_VERSION, key=key, input_fp=input_fp, tally=binarizer.tally, counts=counts,
            decontaminator=binarizer.decontaminator, fingerprint=fingerprint, tokenizer_id=tokenizer_id,
            shards=shards, excluded=excluded,
        )
        if cfg.export:
            manifest["exports"] = _export(tmp, cfg.export)
        # The manifest is written last: a directory with a manifest is a complete dataset.
        write_manifest(manifest, tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:
            if any(directory.iterdir()):
                break
            directory.rmdir()
        raise
    log.info(
        "binarized %d records from %s with recipe %s: %d train, %d test, %d dropped -> %s",
        counts["records_in"], cfg.source, cfg.recipe, counts["train"], counts["test"], counts["dropped"], out_dir,
    )
    return load_prepared(out_dir)
