"""Builders shared by the registry, gate and compare tests: tiny training exports in the format that
`orpo train` writes (train_result.json, a model directory with export_complete.json, metrics.jsonl, a
dataset manifest). Also an MLflow server on loopback. No tests live here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from orpo.config import PipelineConfig, dump_config
from orpo.handoffs import EXPORT_MARKER, DataManifest, TrainResult, write_manifest, write_train_result


def fake_metrics_rows(steps: int = 6, seed: int = 0) -> list[dict]:
    """A plausible ORPO metrics history: loss falling, chosen log-probs rising, eval every 3 steps."""
    rows = []
    for step in range(1, steps + 1):
        loss = 2.0 / (1 + 0.2 * step) + 0.01 * seed
        row = {
            "step": step,
            "loss": loss,
            "nll_loss": loss * 0.9,
            "log_odds_ratio": -0.7 + 0.02 * step,
            "log_odds_chosen": 0.05 * step,
            "logps/chosen": -1.5 + 0.05 * step,
            "logps/rejected": -1.6 - 0.02 * step,
            "rewards/chosen": -0.15 + 0.005 * step,
            "rewards/rejected": -0.16 - 0.002 * step,
            "rewards/margins": 0.01 + 0.007 * step,
            "learning_rate": 5e-6,
            "grad_norm": 1.0 / step,
            "note": "text values are skipped",
        }
        if step % 3 == 0:
            row.update({"eval_loss": loss + 0.1, "eval_rewards/accuracies": 0.5 + 0.02 * step})
        rows.append(row)
    return rows


def make_train_dir(
    root: Path,
    *,
    lora: bool,
    base_dir: Path,
    seed: int = 0,
    complete: bool = True,
    name: str | None = None,
) -> Path:
    """Write a training output directory holding a tiny model (full) or a LoRA adapter on `base_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_dir = root / (name or f"{'lora' if lora else 'full'}-{seed}")
    model_dir = train_dir / "model"
    model_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # a trained adapter is not the identity
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.02)
    else:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    config = PipelineConfig.model_validate(
        {"model": {"name_or_path": "builtin:tiny-llama"}, "train": {"orpo_lambda": round(0.1 + 0.05 * seed, 4),
                                                                    "lora": {"enabled": lora}}}
    )
    dump_config(config, model_dir / "orpo_config.yaml")
    rows = fake_metrics_rows(seed=seed)
    (model_dir / "metrics.json").write_text(json.dumps(rows[-1]))
    metrics_path = train_dir / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    dataset_dir = root / f"dataset-{seed}"
    dataset_dir.mkdir(exist_ok=True)
    write_manifest(DataManifest(fingerprint=f"fp{seed:04d}abcdef", recipe="argilla",
                                input_fingerprints={"sample.jsonl": "in123"}), dataset_dir)
    write_train_result(TrainResult(
        output_dir=train_dir,
        model_dir=model_dir,
        merged_dir=None,
        metrics_path=metrics_path,
        final_metrics={k: v for k, v in rows[-1].items() if k != "note"},
        base_model="builtin:tiny-llama",
        base_model_path=str(base_dir),
        is_lora=lora,
        global_step=len(rows),
        dataset_dir=dataset_dir,
    ))
    if complete:
        (model_dir / EXPORT_MARKER).write_text(json.dumps({"files": sorted(os.listdir(model_dir))}))
    return train_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback with a sqlite backend, for the life of a `with` block."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = root / "mlflow-server.log"

    def __enter__(self) -> MlflowServer:
        import httpx

        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"mlflow server did not answer in 120 s: {self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            # The server runs uvicorn workers in its own process group; stop the whole group we started.
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self._log.close()


def fake_version(name: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """A registered version whose run carries `metrics`, without logging a model (fast, for gate and
    compare tests). Uses the tracking URI set by `configure_mlflow`; returns the version number."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    with mlflow.start_run() as run:
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.set_tags(tags or {})
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags or {}
    )
    return str(version.version)
