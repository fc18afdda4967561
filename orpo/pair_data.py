"""The training data: a prepared DatasetDict, checked before anything is built, tokenized once in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo.config import ConfigError, TrainConfig

# What collate.split_conversation reads; `prompt` is optional (full conversations carry it).
REQUIRED_COLUMNS = ("chosen", "rejected")


def check_dataset(dataset_dir: Path):
    """The DatasetDict at `dataset_dir`, or a ConfigError saying what is missing: the directory, a saved
    DatasetDict, a non-empty train split, the chosen/rejected columns. Cheap (memory-mapped)."""
    import datasets

    if not dataset_dir.is_dir():
        raise ConfigError(f"dataset directory {dataset_dir} does not exist; prepare it first with `orpo data binarize`")
    try:
        splits = datasets.load_from_disk(str(dataset_dir))
    except FileNotFoundError as exc:
        raise ConfigError(f"{dataset_dir} is not a dataset saved with save_to_disk ({exc})") from exc
    except (IndexError, ValueError, OSError) as exc:
        # datasets cannot load a split that save_to_disk wrote without a data file (an empty one).
        raise ConfigError(
            f"{dataset_dir} could not be loaded ({type(exc).__name__}: {exc}); an empty split saved without a "
            "data file fails like this: prepare the dataset again with `orpo data binarize`"
        ) from exc
    if not isinstance(splits, datasets.DatasetDict) or "train" not in splits:
        raise ConfigError(f"{dataset_dir} must hold a DatasetDict with a 'train' split (and optionally 'test')")
    train = splits["train"]
    if len(train) == 0:
        raise ConfigError(
            f"the train split of {dataset_dir} is empty: nothing to train on; see the drop counts in "
            f"{dataset_dir / 'manifest.json'} and re-run `orpo data binarize` with a source that yields pairs"
        )
    missing = [column for column in REQUIRED_COLUMNS if column not in train.column_names]
    if missing:
        raise ConfigError(
            f"the train split of {dataset_dir} has no {', '.join(missing)} column (it has "
            f"{', '.join(train.column_names)}); prepare it with `orpo data binarize`"
        )
    return splits


@dataclass
class PairData:
    train: Any  # datasets.Dataset of tokenized pairs
    test: Any | None
    train_lengths: list[int]
    test_lengths: list[int]


TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                 "prompt_length", "chosen_length", "rejected_length", "length")


def load_pair_data(dataset_dir: Path, tokenizer, train_cfg: TrainConfig, layout: str) -> PairData:
    """Load the prepared DatasetDict and tokenize both splits once, in memory (the source stays untouched).

    The lengths that batching sorts by are the pairs' row lengths in the batch layout used.
    """
    from orpo.collate import row_length, tokenize_pair

    splits = check_dataset(dataset_dir)

    def tokenize(split):
        return split.map(
            lambda example: tokenize_pair(example, tokenizer, train_cfg.max_length, train_cfg.max_prompt_length),
            remove_columns=split.column_names,
            keep_in_memory=True,
            # A fixed fingerprint: hashing the tokenizer closure is slow and the result is never cached.
            new_fingerprint=f"orpo-tokenized-{train_cfg.max_length}-{train_cfg.max_prompt_length}",
            desc="tokenizing",
        )

    def lengths(split) -> list[int]:
        columns = split.select_columns(["prompt_length", "chosen_length", "rejected_length"]).to_dict()
        return [row_length(dict(zip(columns, values)), layout) for values in zip(*columns.values())]

    train = tokenize(splits["train"])
    test = tokenize(splits["test"]) if "test" in splits and len(splits["test"]) else None
    return PairData(
        train=train,
        test=test,
        train_lengths=lengths(train),
        test_lengths=lengths(test) if test is not None else [],
    )


def features(rows: dict[str, list]) -> list[dict[str, Any]]:
    """A column batch (`dataset[indices]`) as the collator's list of per-pair token features."""
    return [{key: rows[key][i] for key in TOKEN_COLUMNS} for i in range(len(rows["length"]))]
