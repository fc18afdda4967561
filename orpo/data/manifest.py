"""manifest.json of a prepared dataset: what went in (every shard with its hash and counts), what came out
(counts, the output fingerprint), and why each dropped record was dropped. Written last: a dataset
directory with a manifest is complete."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.data.readers import DataPreparationError, Shard, file_sha256
from orpo.data.ultrafeedback import DROP_REASONS
from orpo.handoffs import MANIFEST, DataManifest, read_manifest

if TYPE_CHECKING:
    from orpo.config import DataConfig
    from orpo.data.decontaminate import Decontaminator

MANIFEST_NAME = MANIFEST


@dataclass(frozen=True)
class PreparedDataset:
    """A binarized dataset on disk."""

    dataset_dir: Path  # DatasetDict saved with save_to_disk (splits train, test)
    manifest_path: Path  # dataset_dir / "manifest.json"
    fingerprint: str  # sha256 hex over the output pairs' content digests, train then test
    input_fingerprint: str  # sha256 of the input file(s) content, or of hub id + revision
    counts: dict[str, int]  # records_in, pairs, train, test, dropped (total)


def _versions(with_tokenizer: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["orpo-pipeline", "datasets", "pyarrow", "orjson"]
    if with_tokenizer:
        names += ["transformers", "tokenizers"]
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def count_pairs(tally, split_counts: dict[str, int]) -> dict[str, int]:
    """records_in, pairs, train, test, dropped; checked to add up."""
    counts = {
        "records_in": tally.records_in,
        "pairs": sum(split_counts.values()),
        "train": split_counts["train"],
        "test": split_counts["test"],
        "dropped": sum(tally.dropped.values()),
    }
    if counts["train"] + counts["test"] + counts["dropped"] != counts["records_in"]:
        raise DataPreparationError(f"internal error: counts do not add up: {counts}, {dict(tally.dropped)}")
    return counts


def empty_data_message(source: str, counts: dict[str, int], dropped: dict[str, int]) -> str:
    """Why nothing is left, from the drop reasons, and what to do."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]) if n)
    return (
        f"no preference pairs left from {counts['records_in']} records of {source}"
        + (f" (dropped: {reasons})" if reasons else " (the source holds no records)")
        + ".\nCheck data.source and data.recipe, loosen the filters (max_length, max_prompt_tokens, dedupe, "
        "decontamination), or pass --allow-empty to write an empty dataset anyway."
    )


def build_manifest(
    cfg: DataConfig,
    *,
    format_version: str,
    key: str,
    input_fp: str,
    tally,
    counts: dict[str, int],
    decontaminator: Decontaminator | None,
    fingerprint: str,
    tokenizer_id: str | None,
    shards: list[Shard],
    excluded: list[Shard],
) -> dict[str, Any]:
    decontamination = None
    if cfg.decontaminate and decontaminator is not None:
        decontamination = {
            "files": [{"path": p, "sha256": file_sha256(p)} for p in cfg.decontamination_files],
            "eval_prompts": decontaminator.eval_prompt_count,
            "ngram": cfg.decontamination_ngram,
            "sources": sorted(decontaminator.sources),
            "by_rule": {rule: tally.decontaminated.get(rule, 0) for rule in ("source", "exact", "ngram")},
            "examples": tally.decontamination_examples,
        }
    return {
        "format": format_version,
        "dataset_key": key,
        "source": cfg.source,
        "source_revision": cfg.source_revision,
        "input_fingerprint": input_fp,
        "recipe": cfg.recipe,
        "seed": cfg.seed,
        "options": cfg.model_dump(mode="json", exclude={"output_dir"}),
        "tokenizer": tokenizer_id,
        "counts": counts,
        "dropped": {reason: tally.dropped.get(reason, 0) for reason in DROP_REASONS},
        "shards": [
            {"name": s.name, "sha256": s.sha256, "size": s.size, "records": tally.shard_records.get(i, 0),
             "pairs": tally.shard_pairs.get(i, 0)}
            for i, s in enumerate(shards)
        ],
        # Shards present in the source but left out (data.incremental: seen by the start model's data).
        "excluded_shards": [{"name": s.name, "sha256": s.sha256, "size": s.size} for s in excluded],
        "malformed_examples": tally.malformed_examples,
        # The first records dropped for each other reason (decontaminated ones are under decontamination).
        "drop_examples": {reason: tally.drop_examples[reason] for reason in DROP_REASONS
                          if reason in tally.drop_examples},
        "non_numeric_ratings": tally.non_numeric_ratings,
        "non_numeric_overall_scores": tally.non_numeric_overall_scores,
        "prebinarized_records": tally.prebinarized_records,
        "decontamination": decontamination,
        "fingerprint": fingerprint,
        "versions": _versions(tokenizer_id is not None),
    }


def seen_shards(manifest: DataManifest | str | Path) -> set[str]:
    """Content hashes of every shard a dataset's model has seen: its own and those it left out as seen."""
    if not isinstance(manifest, DataManifest):
        manifest = read_manifest(manifest)
    excluded = (manifest.model_extra or {}).get("excluded_shards") or []
    return {s.sha256 for s in manifest.shards} | {s["sha256"] for s in excluded}


def load_prepared(dataset_dir: str | Path) -> PreparedDataset:
    """Re-read a dataset directory written by prepare_dataset (its manifest; the data stays on disk)."""
    dataset_dir = Path(dataset_dir)
    manifest_path = dataset_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataPreparationError(
            f"{dataset_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `orpo data binarize` first"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return PreparedDataset(
        dataset_dir=dataset_dir,
        manifest_path=manifest_path,
        fingerprint=manifest["fingerprint"],
        input_fingerprint=manifest["input_fingerprint"],
        counts=dict(manifest["counts"]),
    )


def reusable(out_dir: Path, key: str, tokenizer_id: str | None) -> PreparedDataset | None:
    """The dataset already in `out_dir` when it was built with the same key and tokenizer."""
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("dataset_key") != key or manifest.get("tokenizer") != tokenizer_id:
        return None
    return load_prepared(out_dir)
