"""`orpo register`, `orpo compare`, `orpo ui`: plain functions that `orpo.cli` mounts on its typer app.

Typer reads the options from the signatures' defaults, so each mounts with `app.command()(fn)`. MLflow,
pandas and matplotlib are imported inside the commands to keep `orpo --help` fast.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()
log = logging.getLogger(__name__)

_CONFIG_HELP = (
    "YAML config (see configs/); its registry section names the store and the model. Defaults apply when omitted."
)


def _load_config(config: Optional[Path], overrides: Optional[list[str]] = None):
    from orpo.config import load_config

    return load_config(config, overrides or [])  # a ConfigError exits 2 through orpo.cli.OrpoGroup


def register(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    train_dir: Path = typer.Argument(..., help="Output directory of `orpo train` (holds train_result.json)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Dotted overrides, e.g. registry.registered_model_name=my-model."
    ),
) -> None:
    """Register a training export in MLflow as a new model version with alias `challenger`.

    Logs the run (params, metric histories, curves, data manifest, config) and the model (LoRA: adapter + base).

    The same export registered again returns its version; one without export_complete.json is refused.
    """
    from orpo.registry import register_training_run

    cfg = _load_config(config, overrides)
    version = register_training_run(cfg, train_dir)
    state = "registered" if version.created else "already registered as"
    console.print(f"{state} [bold]{version.model_uri}[/bold] (MLflow run {version.run_id})")
    console.print(f"store: {cfg.resolved_tracking_uri()}")


def _format(value: object, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def compare(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Registered model name (default: from the config)."),
    versions: Optional[str] = typer.Option(
        None, "--versions", help="Comma-separated versions, e.g. 3,4,5 (default: all)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Chart PNG path (default: <workdir>/compare/<name>-<versions>.png)."
    ),
) -> None:
    """Compare registered versions: key metrics with deltas against the champion, and a chart.

    Prints MT-Bench, AlpacaEval and preference metrics of each version with their delta against `champion`.

    Writes a PNG (per-category MT-Bench scores side by side, win rates) and logs it to MLflow in a `compare` run.
    """
    from rich.table import Table

    from orpo.compare import DELTA_PREFIX, KEY_METRICS, compare_versions, default_png_path, log_comparison

    cfg = _load_config(config)
    if name:
        cfg.registry.registered_model_name = name
    wanted = [v.strip() for v in versions.split(",") if v.strip()] if versions else None
    try:
        frame = compare_versions(cfg, wanted)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if frame.empty:
        console.print(f"[yellow]{cfg.registry.registered_model_name} has no versions yet[/yellow]")
        raise typer.Exit(1)
    png = out or default_png_path(cfg, list(frame.index))
    from orpo.compare import plot_comparison

    plot_comparison(frame, png, title=f"{cfg.registry.registered_model_name}: versions {', '.join(frame.index)}")

    table = Table(title=f"{cfg.registry.registered_model_name}: versions (delta vs champion)")
    table.add_column("version", justify="right")
    table.add_column("aliases")
    table.add_column("finetune")
    metrics = frame.attrs.get("key_metrics", list(KEY_METRICS))
    for metric in metrics:
        table.add_column(metric, justify="right")
        table.add_column("delta", justify="right")
    for version, row in frame.iterrows():
        cells = [str(version), row["aliases"], str(row["finetune"])]
        for metric in metrics:
            cells += [_format(row[metric]), _format(row[DELTA_PREFIX + metric], signed=True)]
        table.add_row(*cells)
    console.print(table)
    _print_gate_decisions(frame)
    run_id = log_comparison(cfg, frame, png)
    console.print(f"chart: [bold]{png}[/bold] (logged to MLflow run {run_id})")


def _print_gate_decisions(frame) -> None:
    """The head-to-head differences each version's gate decision recorded, with their intervals."""
    from rich.table import Table

    from orpo.compare import H2H_PREFIX

    metrics = [c[len(H2H_PREFIX):] for c in frame.columns
               if c.startswith(H2H_PREFIX) and not c.endswith((" low", " high", " n"))]
    if not metrics:
        return
    table = Table(title="gate decisions: challenger vs the champion it faced (estimate [interval], n)")
    for column in ("version", "decision", "vs", *metrics):
        table.add_column(column, justify="right" if column in metrics else "left")
    for version, row in frame.iterrows():
        if not row.get("gate.decision"):
            continue
        cells = [str(version), str(row["gate.decision"]), str(row.get("gate.champion_version", ""))]
        for metric in metrics:
            estimate = row.get(H2H_PREFIX + metric, math.nan)
            cells.append("-" if math.isnan(estimate) else
                         f"{estimate:.3g} [{row[f'{H2H_PREFIX}{metric} low']:.3g}, "
                         f"{row[f'{H2H_PREFIX}{metric} high']:.3g}], n={row[f'{H2H_PREFIX}{metric} n']:.0f}")
        table.add_row(*cells)
    console.print(table)


def ui(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    port: int = typer.Option(5000, "--port", "-p", help="Port on 127.0.0.1."),
) -> None:
    """Open the MLflow UI on the pipeline's store, bound to 127.0.0.1 (Ctrl-C stops it).

    Serves <workdir>/mlflow.db and <workdir>/mlartifacts; a tracking URI that is a server is just printed.
    """
    from orpo.registry import configure_mlflow

    cfg = _load_config(config)
    uri = cfg.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        console.print(f"the tracking store is a server: open [bold]{uri}[/bold]")
        return
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    configure_mlflow(cfg)  # creates and migrates the database before the server reads it
    command = server_command(uri, Path(cfg.workdir).resolve() / "mlartifacts", port)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    console.print(f"MLflow UI on [bold]http://127.0.0.1:{port}[/bold] for {uri} (Ctrl-C to stop)")
    try:
        completed = subprocess.run(command, env=env, check=False)
    except KeyboardInterrupt:
        return
    if completed.returncode not in (0, -2, 130):
        raise typer.Exit(completed.returncode)


def server_command(backend_uri: str, artifacts_dir: Path, port: int) -> list[str]:
    """The `mlflow server` command line for a local store, on loopback only."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts_dir),
    ]


def gate(
    challenger: str = typer.Option(..., "--challenger", help="The challenger: models:/NAME/N (or models:/NAME@ALIAS)."),
    champion: Optional[str] = typer.Option(
        None, "--champion", help="The champion to beat (default: models:/NAME@champion)."
    ),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    promote: bool = typer.Option(
        False, "--promote", help="Move the champion alias when the challenger passes and record the decision."
    ),
    start_report: Optional[Path] = typer.Option(
        None, "--start-report", help="The start model's evaluation directory (<workdir>/reports/base-*): drawn in "
        "the chart, and, with no champion yet, what the challenger must beat (registry.gate.first_version)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Folder for decision.json, the annotations and the chart "
        "(default: <workdir>/gate/<name>-v<challenger>-vs-v<champion>)."
    ),
) -> None:
    """Run the promotion gate on two registered versions by hand (a dry run unless --promote).

    Compares the challenger with the champion as registry.gate says (head_to_head: on the same prompts,
    each difference with its confidence interval) and prints the decision with every difference. With no
    champion yet, the challenger is compared with the start model's evaluation (--start-report).
    """
    from orpo.gate import decision_markdown, promote as run_gate, resolve_version

    cfg = _load_config(config)
    try:
        version = resolve_version(cfg, challenger)
        against = resolve_version(cfg, champion).version if champion else None
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if champion and not champion.strip().startswith(f"models:/{version.name}"):
        console.print(f"[red]--champion must be a version of {version.name}, the challenger's model[/red]")
        raise typer.Exit(2)
    decision = run_gate(cfg, version, champion_version=against, dry_run=not promote, start_report_dir=start_report,
                        out_dir=out)
    console.print(decision_markdown(decision), markup=False)
    if decision.chart:
        console.print(f"chart: [bold]{decision.chart}[/bold]")
    if decision.champion_version is None and decision.opponent and start_report is None:
        # The pipeline scores start models into <workdir>/reports/base-<model>; which one (and on which data)
        # this version was trained from is for the user to say, so they are listed, not picked.
        found = sorted(p.parent for p in (Path(cfg.workdir) / "reports").glob("base-*/report.json"))
        if found:
            console.print("start-model evaluations in this workdir (pass one with --start-report):", markup=False)
            for path in found:
                console.print(f"  {path}", markup=False)
    if not promote:
        console.print("[yellow]dry run: nothing changed in the registry (add --promote to act on it)[/yellow]")
