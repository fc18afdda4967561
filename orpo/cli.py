"""`orpo`: the command line. Each command calls the same library function a Prefect task calls.

Heavy libraries (torch, transformers, mlflow, prefect) are imported inside the commands so that
`orpo --help` answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from orpo.config import ConfigError, dump_config, load_config

app = typer.Typer(
    name="orpo",
    help="ORPO alignment pipeline: prepare data, train, register, evaluate, promote, on a schedule.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True)
model_app = typer.Typer(help="Resolve and cache models (built-ins convert once, offline).", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Prefect server, deployment server, MLflow server.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(stack_app, name="stack")

console = Console()

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config (see configs/); defaults apply when omitted.")
OVERRIDES_ARGUMENT = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-5 eval.alpaca_limit=8.")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "alembic", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


# --- config -----------------------------------------------------------------------------------------


@config_app.command("show")
def config_show(config: Optional[Path] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Print the fully resolved configuration (every default spelled out) as YAML."""
    import yaml

    cfg = _load(config, overrides)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False, markup=False)


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="YAML config to check.")) -> None:
    """Check a config file; exit 2 with the offending keys when it is invalid."""
    cfg = _load(config, None)
    console.print(f"[green]{config} is valid[/green] (config hash {cfg.config_hash()})")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the configuration (what the Prefect UI form is built from)."""
    import json

    from orpo.config import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))


# --- models -----------------------------------------------------------------------------------------


@model_app.command("resolve")
def model_resolve(
    spec: str = typer.Argument(..., help="Hub id, local dir, models:/ URI, or builtin:smollm2-135m-instruct."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache for built-in models."),
) -> None:
    """Resolve a model spec to a loadable directory (built-ins are converted and cached once)."""
    from orpo.models import ModelResolutionError, resolve_model

    try:
        resolved = resolve_model(spec, cache_dir)
    except ModelResolutionError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print(resolved.path)


# --- stages -----------------------------------------------------------------------------------------


def _mount_data() -> None:
    from orpo.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Prepare preference data (binarize UltraFeedback and friends).")


def _mount_eval() -> None:
    from evals.cli import app as eval_app

    app.add_typer(eval_app, name="eval", help="Evaluate a model: AlpacaEval, MT-Bench, diversity, preference, lm-eval.")


def _mount_registry() -> None:
    from orpo import registry_cli

    app.command("register", help=registry_cli.register.__doc__)(registry_cli.register)
    app.command("compare", help=registry_cli.compare.__doc__)(registry_cli.compare)
    app.command("ui", help=registry_cli.ui.__doc__)(registry_cli.ui)


@app.command("train")
def train_command(
    config: Optional[Path] = CONFIG_OPTION,
    dataset_dir: Optional[Path] = typer.Option(
        None, help="Prepared dataset dir (orpo data binarize); default: prepare it from the config's data section."
    ),
    output_dir: Optional[Path] = typer.Option(None, help="Training output dir; an existing one is resumed."),
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Train with ORPO in this process (use `accelerate launch -m orpo.train` for several GPUs)."""
    cfg = _load(config, overrides)
    if dataset_dir is None:
        dataset_dir = _prepare(cfg).dataset_dir
    from orpo.train import train

    result = train(cfg, dataset_dir, output_dir)
    console.print(f"model exported to [bold]{result.model_dir}[/bold] after {result.global_step} steps")


def _prepare(cfg):
    from orpo.data.binarize import default_dataset_dir, prepare_dataset

    return prepare_dataset(cfg.data, default_dataset_dir(cfg.data, cfg.workdir))


@app.command("run")
def run_command(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Run the whole pipeline once as a Prefect flow: prepare -> train -> register -> evaluate -> promote."""
    cfg = _load(config, overrides)
    from flows.pipeline import alignment_pipeline

    summary = alignment_pipeline(config=cfg)
    _print_summary(summary, ui_command="orpo ui" + (f" --config {config}" if config else ""))


# Headline metrics for the before/after table, in the order a reader scans them.
_HEADLINE = (
    "preference/accuracy", "preference/margin", "alpaca/win_rate", "alpaca/length_controlled_winrate",
    "mt_bench/score", "mt_bench/turn_1", "mt_bench/turn_2", "diversity/distinct_2", "diversity/self_bleu",
)


def _print_summary(summary, ui_command: str) -> None:
    from rich.table import Table

    table = Table(title=f"Pipeline run {summary.run_name}", show_lines=False)
    table.add_column("metric")
    table.add_column("before (start model)", justify="right")
    table.add_column("after (ORPO)", justify="right")
    table.add_column("change", justify="right")
    names = [n for n in _HEADLINE if n in summary.metrics]
    names += sorted(n for n in summary.metrics if n not in names and "/category/" not in n)
    for name in names:
        after = summary.metrics[name]
        before = summary.base_metrics.get(name)
        change = "" if before is None else f"{after - before:+.3f}"
        table.add_row(name, "" if before is None else f"{before:.3f}", f"{after:.3f}", change)
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.data_counts.items()))
    console.print(f"data: {summary.dataset_dir} ({counts}; fingerprint {summary.data_fingerprint[:12]})")
    console.print(f"training: {summary.global_step} steps -> {summary.model_dir}")
    console.print(f"registered: [bold]{summary.model_uri}[/bold] (MLflow run {summary.mlflow_run_id})")
    verdict = "[green]promoted to champion[/green]" if summary.promoted else "[yellow]not promoted[/yellow]"
    console.print(f"gate: {verdict}: {summary.decision}")
    console.print(f"report: {summary.report_dir}/report.md")
    console.print(f"MLflow store: {summary.tracking_uri}")
    console.print(f"open the MLflow UI: [bold]{ui_command}[/bold] (from .venv/bin), then http://127.0.0.1:5000")


@app.command("deploy")
def deploy_command(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Serve the deployments (nightly-alignment on its cron schedule, on-demand, stage flows) until stopped."""
    cfg = _load(config, overrides)
    from flows.deploy import serve_deployments

    serve_deployments(cfg, config_path=str(config) if config else None)


@stack_app.command("up")
def stack_up(
    config: Optional[Path] = CONFIG_OPTION,
    prefect_port: int = typer.Option(4200, help="Prefect server port on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, help="MLflow server port on 127.0.0.1."),
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Start a Prefect server, the deployment server and an MLflow server on 127.0.0.1; wait until healthy."""
    cfg = _load(config, overrides)
    from flows.stack import stack_up as up

    info = up(cfg, config_path=str(config) if config else None, prefect_port=prefect_port, mlflow_port=mlflow_port)
    console.print(f"Prefect UI: [bold]{info.prefect_url}[/bold]\nMLflow UI:  [bold]{info.mlflow_url}[/bold]")
    console.print(f"logs and PIDs in {info.state_dir}; stop with `orpo stack down`")


@stack_app.command("down")
def stack_down(config: Optional[Path] = CONFIG_OPTION) -> None:
    """Stop exactly the processes `orpo stack up` started."""
    cfg = _load(config, None)
    from flows.stack import stack_down as down

    for line in down(cfg):
        console.print(line)


@stack_app.command("status")
def stack_status(config: Optional[Path] = CONFIG_OPTION) -> None:
    """Show which stack processes are running."""
    cfg = _load(config, None)
    from flows.stack import stack_status as status

    for line in status(cfg):
        console.print(line)


@app.command("dump-config", hidden=True)
def dump_config_command(out: Path, config: Optional[Path] = CONFIG_OPTION) -> None:
    dump_config(_load(config, None), out)


def _mount_all() -> None:
    for mount in (_mount_data, _mount_eval, _mount_registry):
        mount()


# Quiet by default (a user's own setting wins): no telemetry, and an ephemeral Prefect API that is given time
# to start on a busy laptop (its default 20 s is too short on 2 cores).
_DEFAULT_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
}


def main(argv: list[str] | None = None) -> None:
    import os

    for key, value in _DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if argv is None:  # the real command line: `orpo train` restarts once under the training allocator settings
        from orpo.memory import reexec_for_training

        reexec_for_training(sys.argv[1:])
    _mount_all()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="orpo")


if __name__ == "__main__":
    main()
