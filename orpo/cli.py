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
from rich.markup import escape
from typer.core import TyperGroup

from orpo.config import dump_config, load_config
from orpo.errors import DEBUG_ENV, OrpoError, debug_enabled


# Set by the `orpo` callback on every invocation: `orpo --debug ...`.
_OPTIONS = {"debug": False}


def _debug() -> bool:
    return debug_enabled() or _OPTIONS["debug"]


class OrpoGroup(TyperGroup):
    """The one place anticipated errors become a message: whatever command raised an `OrpoError`, the user
    sees its message and the exit code (1, or 2 for invalid input), not a traceback, unless `--debug` or
    ORPO_DEBUG=1 asks for it. Every `orpo` typer app (and the groups it mounts) uses this class."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except OrpoError as exc:
            if _debug():
                raise
            err = Console(stderr=True, highlight=False)
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            err.print(f"[dim](for the traceback: orpo --debug ... or {DEBUG_ENV}=1)[/dim]")
            raise typer.Exit(exc.exit_code) from None


class _NoOrpoErrorTraceback(logging.Formatter):
    """Formats as `inner` does, without the traceback of an OrpoError: Prefect logs every failed task with
    its traceback, and for an anticipated error the message says it all. Other exceptions keep theirs."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        self.inner = inner or logging.Formatter()
        super().__init__(datefmt=self.inner.datefmt)  # handlers such as rich's read the date format from here

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], OrpoError)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None  # restored: other handlers (Prefect's API) keep it
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _brief_flow_logs() -> None:
    """Console handlers of this process (ours and Prefect's) leave out OrpoError tracebacks."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import APILogHandler

    ensure_logging_setup()
    names = [name for name in logging.root.manager.loggerDict if name.startswith("prefect")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in logger.handlers:
            if not isinstance(handler, APILogHandler) and not isinstance(handler.formatter, _NoOrpoErrorTraceback):
                handler.setFormatter(_NoOrpoErrorTraceback(handler.formatter))


app = typer.Typer(
    name="orpo",
    help="ORPO alignment pipeline: prepare data, train, register, evaluate, promote, on a schedule.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OrpoGroup,
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
    return load_config(config, overrides or [])  # a ConfigError exits 2 through OrpoGroup


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    debug: bool = typer.Option(False, "--debug", help=f"Tracebacks for anticipated errors too (or {DEBUG_ENV}=1)."),
) -> None:
    _OPTIONS["debug"] = debug
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
    from orpo.models import check_model_available

    print(check_model_available(spec, cache_dir).path)


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
    app.command("gate", help=registry_cli.gate.__doc__)(registry_cli.gate)


@app.command("train")
def train_command(
    config: Optional[Path] = CONFIG_OPTION,
    dataset_dir: Optional[Path] = typer.Option(
        None, help="Prepared dataset dir (orpo data binarize); default: prepare it from the config's data section."
    ),
    output_dir: Optional[Path] = typer.Option(None, help="Training output dir; an existing one is resumed."),
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Train with ORPO in this process (use `accelerate launch -m orpo.train` for several GPUs).

    Restarts itself once under the training allocator (ORPO_ALLOCATOR, default auto: tcmalloc if installed).
    """
    cfg = _load(config, overrides)
    from orpo.models import check_model_available

    # A wrong model name or an unreachable hub fails here, before data is prepared or an output dir exists.
    check_model_available(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision)
    if dataset_dir is None:
        dataset_dir = _prepare(cfg).dataset_dir
    from orpo.train import train

    result = train(cfg, dataset_dir, output_dir)
    console.print(f"model exported to [bold]{result.model_dir}[/bold] after {result.global_step} steps")


def _preflight(cfg) -> None:
    """What a run needs from outside, checked in seconds before anything is built or started: the model
    (a wrong name or an unreachable hub), a local data source, and an MLflow tracking server."""
    from orpo.data.readers import input_files, is_hub_id
    from orpo.models import check_model_available
    from orpo.registry import check_tracking_server

    check_tracking_server(cfg.resolved_tracking_uri())
    if not is_hub_id(cfg.data.source):
        input_files(cfg.data.source)
    check_model_available(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision)  # may build a built-in


def _prepare(cfg):
    from orpo.data.binarize import default_dataset_dir, prepare_dataset

    template = cfg.model.chat_template  # the length limits count tokens as training renders them
    return prepare_dataset(cfg.data, default_dataset_dir(cfg.data, cfg.workdir, chat_template=template),
                           chat_template=template)


@app.command("run")
def run_command(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    force: bool = typer.Option(
        False, "--force", help="Train even when a registered version already has the same inputs."
    ),
) -> None:
    """Run the whole pipeline once as a Prefect flow: prepare -> train -> register -> evaluate -> promote."""
    cfg = _load(config, overrides)
    _preflight(cfg)
    from flows.pipeline import alignment_pipeline

    if not _debug():
        _brief_flow_logs()
    summary = alignment_pipeline(config=cfg, force=force)
    if summary.unchanged_since is not None:
        console.print(f"unchanged since version {summary.unchanged_since} ({summary.model_uri}): same data, "
                      "config, start model and code; nothing trained. `orpo run --force` trains anyway.")
        return
    _print_summary(summary, ui_command="orpo ui" + (f" --config {config}" if config else ""))


@app.command("ablate")
def ablate_command(
    config: Optional[Path] = CONFIG_OPTION,
    quick: bool = typer.Option(False, "--quick", help="One seed, one lambda, a few steps: minutes on a CPU."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Rebuild ablation.study's report from the arms that finished; train nothing."
    ),
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """SFT only vs ORPO (ablation.orpo_lambdas) vs SFT+DPO on the same data, seed and steps; registers and reports."""
    cfg = _load(config, overrides)
    from flows.ablation import ablation_study
    from orpo.ablation.arms import check_study, quick_config
    from orpo.ablation.study import rebuild_report, study_meta

    effective = quick_config(cfg) if quick else cfg
    if report_only:
        meta = study_meta(effective, effective.ablation.study or "", quick=quick)
        console.print(f"report: [bold]{rebuild_report(effective, meta)}[/bold]")
        return
    check_study(effective)  # its ConfigErrors are printed by OrpoGroup, exit 2
    summary = ablation_study(config=cfg, quick=quick)
    for arm, uri in summary.versions.items():
        shown = {k: round(v, 3) for k, v in summary.metrics[arm].items() if k.startswith(("preference/", "diversity/"))}
        console.print(f"{arm}: [bold]{uri}[/bold] {shown}")
    numbers = ",".join(uri.rsplit("/", 1)[-1] for uri in summary.versions.values())
    console.print(f"report: [bold]{summary.report}[/bold] ({summary.wall_seconds / 60:.1f} min)")
    console.print(f"compare: orpo compare{f' --config {config}' if config else ''} "
                  f"--name {summary.registered_model_name} --versions {numbers}")


# Headline metrics for the before/after table, in the order a reader scans them.
_HEADLINE = (
    "preference/accuracy", "preference/margin", "alpaca_eval2/win_rate", "alpaca_eval2/length_controlled_winrate",
    "mt_bench/score", "mt_bench/turn_1", "mt_bench/turn_2", "diversity/distinct_2", "diversity/self_bleu",
)


def _print_summary(summary, ui_command: str) -> None:
    from rich.table import Table

    table = Table(title=f"Pipeline run {summary.run_name}", show_lines=False)
    table.add_column("metric", overflow="fold")  # the name says the protocol: never cut it short
    table.add_column("before (start model)", justify="right")
    table.add_column("after (ORPO)", justify="right")
    table.add_column("change", justify="right")
    table.add_column("protocol")
    from evals.protocols import describe_metric

    names = [n for n in _HEADLINE if n in summary.metrics]
    names += sorted(n for n in summary.metrics if n not in names and "/category/" not in n)
    for name in names:
        after = summary.metrics[name]
        before = summary.base_metrics.get(name)
        change = "" if before is None else f"{after - before:+.3f}"
        table.add_row(name, "" if before is None else f"{before:.3f}", f"{after:.3f}", change,
                      describe_metric(name, short=True))
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


PREFECT_PORT_OPTION = typer.Option(4200, help="Prefect server port on 127.0.0.1.")
MLFLOW_PORT_OPTION = typer.Option(5000, help="MLflow server port on 127.0.0.1.")


@stack_app.command("up")
def stack_up(
    config: Optional[Path] = CONFIG_OPTION,
    prefect_port: int = PREFECT_PORT_OPTION,
    mlflow_port: int = MLFLOW_PORT_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Start a Prefect server, the deployment server and an MLflow server on 127.0.0.1; wait until healthy."""
    cfg = _load(config, overrides)
    from flows.stack import stack_up as up

    info = up(cfg, config_path=str(config) if config else None, prefect_port=prefect_port, mlflow_port=mlflow_port)
    console.print(f"Prefect UI: [bold]{info.prefect_url}[/bold]\nMLflow UI:  [bold]{info.mlflow_url}[/bold]")
    again = " ".join([*([f"--config {config}"] if config else []), *(overrides or [])])
    console.print(f"logs and PIDs in {info.state_dir}; stop with `orpo stack down{' ' + again if again else ''}`")


def _print_stack(action, config: Optional[Path], prefect_port: int, mlflow_port: int,
                 overrides: Optional[list[str]]) -> None:
    """`down` and `status` find the stack as `up` recorded it: from the same config and overrides."""
    for line in action(_load(config, overrides), ports=(prefect_port, mlflow_port)):
        console.print(line)


@stack_app.command("down")
def stack_down(
    config: Optional[Path] = CONFIG_OPTION,
    prefect_port: int = PREFECT_PORT_OPTION,
    mlflow_port: int = MLFLOW_PORT_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Stop exactly the processes `orpo stack up` started (give it the same --config and overrides)."""
    from flows.stack import stack_down as down

    _print_stack(down, config, prefect_port, mlflow_port, overrides)


@stack_app.command("status")
def stack_status(
    config: Optional[Path] = CONFIG_OPTION,
    prefect_port: int = PREFECT_PORT_OPTION,
    mlflow_port: int = MLFLOW_PORT_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Show which stack processes are running (give it the same --config and overrides as `up`)."""
    from flows.stack import stack_status as status

    _print_stack(status, config, prefect_port, mlflow_port, overrides)


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
