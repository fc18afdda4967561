"""`orpo data ...`: binarize preference data from the command line.

    orpo data binarize --source data/samples/ultrafeedback_sample.jsonl --recipe argilla --out runs/data/demo \\
        --test-size 0.1 --decontamination-file ../shared/data/mt_bench/question.jsonl
    python -m orpo.data.cli binarize --source openbmb/UltraFeedback --recipe h4 --out runs/data/uf-h4

Options start from the `data:` section of --config (or the defaults) and the flags given override it.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from orpo.cli import OrpoGroup

app = typer.Typer(
    help="Preference data: binarize raw UltraFeedback (or binarized sets) into prompt/chosen/rejected pairs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OrpoGroup,
)
console = Console()
log = logging.getLogger(__name__)


class RecipeChoice(str, Enum):
    h4 = "h4"
    argilla = "argilla"
    max_min = "max-min"


class OnErrorChoice(str, Enum):
    fail = "fail"
    skip = "skip"


class ExportChoice(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"


@app.callback()
def _group() -> None:
    """Preference data commands."""


def _data_config(config: Path | None, overrides: dict[str, Any]):
    """(data config, workdir, model.chat_template): the config file's data section (or the defaults) with the
    flags that were given applied, validated; where datasets go by default; the template training renders."""
    from pydantic import ValidationError

    from orpo.config import DataConfig, load_config

    pipeline = load_config(config) if config is not None else None  # a ConfigError exits 2 through OrpoGroup
    base = pipeline.data if pipeline is not None else DataConfig()
    merged = {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return (DataConfig.model_validate(merged), Path(pipeline.workdir if pipeline is not None else "runs"),
                pipeline.model.chat_template if pipeline is not None else None)
    except ValidationError as exc:
        for item in exc.errors():
            key = ".".join(str(part) for part in item["loc"])
            console.print(f"[red]data.{key}: {item['msg']} (got {item.get('input')!r})[/red]")
        raise typer.Exit(2) from None


def _summary(prepared, manifest: dict[str, Any]) -> Table:
    table = Table(title=f"{manifest['recipe']} pairs -> {prepared.dataset_dir}", show_header=True)
    table.add_column("count")
    table.add_column("records", justify="right")
    counts = manifest["counts"]
    table.add_row("records in", str(counts["records_in"]))
    table.add_row("train", str(counts["train"]), style="green")
    table.add_row("test", str(counts["test"]), style="green")
    for reason, count in manifest["dropped"].items():
        if count:
            table.add_row(f"dropped: {reason}", str(count), style="yellow")
    table.add_row("dropped (total)", str(counts["dropped"]))
    if manifest.get("non_numeric_ratings"):
        table.add_row("non-numeric ratings (ignored)", str(manifest["non_numeric_ratings"]), style="dim")
    if len(manifest.get("shards") or []) > 1:
        table.add_row("shards read", str(len(manifest["shards"])), style="dim")
    return table


@app.command("binarize")
def binarize(
    source: str | None = typer.Option(
        None, "--source", "-s", help="JSONL/JSON/Parquet file, a directory or glob of them (shards), or a hub id."
    ),
    recipe: RecipeChoice | None = typer.Option(None, "--recipe", "-r", help="How chosen/rejected are picked."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output dataset directory (default: data.output_dir, else <workdir>/data/<key>)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for the random rejected completion."),
    test_size: float | None = typer.Option(None, "--test-size", help="Share of prompts in the test split."),
    decontaminate: bool | None = typer.Option(
        None, "--decontaminate/--no-decontaminate", help="Drop truthful_qa and prompts overlapping eval prompts."
    ),
    decontamination_files: list[Path] | None = typer.Option(
        None, "--decontamination-file", help="MT-Bench question.jsonl / AlpacaEval json; repeat for several."
    ),
    dedupe: bool | None = typer.Option(None, "--dedupe/--no-dedupe", help="Keep each prompt once."),
    fix_overall_score: bool | None = typer.Option(
        None, "--fix-overall-score", help="Apply the 2023 overall_score fix (10 with ratings <= 2 -> 1)."
    ),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", help="Drop longer prompts."),
    max_length: int | None = typer.Option(None, "--max-length", help="Drop longer prompt+response pairs."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Model spec whose tokenizer counts tokens."),
    on_error: OnErrorChoice | None = typer.Option(
        None, "--on-error", help="Malformed records: fail (default) or skip and count."
    ),
    export: ExportChoice | None = typer.Option(None, "--export", help="Also export the splits as files."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config whose data section to start from."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Write the dataset even when no pair is left (default: exit 1 with the reasons)."
    ),
) -> None:
    """Binarize preference data into a DatasetDict (train/test) + manifest.json."""
    import json

    from orpo.data.binarize import default_dataset_dir, prepare_dataset

    cfg, workdir, chat_template = _data_config(
        config,
        {
            "source": source,
            "recipe": recipe.value if recipe else None,
            "seed": seed,
            "test_size": test_size,
            "decontaminate": decontaminate,
            "decontamination_files": [str(p) for p in decontamination_files] if decontamination_files else None,
            "dedupe": dedupe,
            "fix_overall_score": fix_overall_score,
            "max_prompt_tokens": max_prompt_tokens,
            "max_length": max_length,
            "tokenizer": tokenizer,
            "on_error": on_error.value if on_error else None,
            "export": export.value if export else None,
            "output_dir": str(out) if out else None,
        },
    )
    target = default_dataset_dir(cfg, workdir, chat_template=chat_template)
    # its errors are OrpoErrors: OrpoGroup prints them
    prepared = prepare_dataset(cfg, target, progress=progress, allow_empty=allow_empty, chat_template=chat_template)
    manifest = json.loads(prepared.manifest_path.read_text(encoding="utf-8"))
    console.print(_summary(prepared, manifest))
    console.print(f"fingerprint {prepared.fingerprint}", style="dim", highlight=False)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
