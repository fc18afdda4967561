"""Preference data: raw UltraFeedback (or already-binarized sets) -> prompt/chosen/rejected pairs on disk.

`prepare_dataset` is the one entry point the CLI (`orpo data binarize`) and the Prefect task share.
Importing this package is cheap: datasets/pyarrow/transformers load only when a dataset is built.

    readers.py       sources (a file, a directory or glob of shards, a hub dataset) -> raw records; shard hashes
    ultrafeedback.py the raw schema and the recipes (record -> pair or drop reason)
    decontaminate.py truthful_qa and evaluation-prompt overlap
    pool.py          worker processes for large JSONL files
    binarize.py      the pass: length limit, dedupe, split, Arrow writers, atomic replace
    manifest.py      manifest.json: shards, counts, drop reasons, fingerprint
"""

from orpo.data.binarize import (
    DataPreparationError,
    PreparedDataset,
    dataset_key,
    input_fingerprint,
    load_prepared,
    output_features,
    prepare_dataset,
)
from orpo.data.decontaminate import (
    DecontaminationFileError,
    Decontaminator,
    load_eval_prompts,
)
from orpo.data.ultrafeedback import (
    DROP_REASONS,
    RECIPES,
    MalformedRecordError,
    Pair,
    binarize_record,
    parse_record,
)

__all__ = [
    "DROP_REASONS",
    "RECIPES",
    "DataPreparationError",
    "DecontaminationFileError",
    "Decontaminator",
    "MalformedRecordError",
    "Pair",
    "PreparedDataset",
    "binarize_record",
    "dataset_key",
    "input_fingerprint",
    "load_eval_prompts",
    "load_prepared",
    "output_features",
    "parse_record",
    "prepare_dataset",
]
