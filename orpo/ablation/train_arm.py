"""Train one arm of an ablation study in this process and record what it cost.

    python -m orpo.ablation.train_arm --config ARM.yaml --dataset-dir DATA --output-dir OUT [--sft-dir SFT_OUT]

Without `--sft-dir` it trains with our ORPO trainer at the config's `train.orpo_lambda` (0 = SFT only);
with it, it runs the DPO phase on top of that SFT export. Each arm runs in its own process so that its
peak memory (`orpo.train.peak_memory_mb`: this process's peak RSS on CPU, peak allocated on CUDA) is its own.
Writes, besides the usual export: timeline.jsonl (held-out accuracy against training seconds) and
resources.json (wall and training seconds, peak memory).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from orpo.ablation.timeline import Timeline, make_timeline, read_resources, write_resources
from orpo.config import ConfigError, PipelineConfig, load_config
from orpo.train import ORPORecipe, peak_memory_mb

log = logging.getLogger(__name__)


class TimedORPORecipe(ORPORecipe):
    """The ORPO trainer, unchanged, with a held-out probe after each of its periodic evaluations, and one
    evaluation + probe of the start model at step 0. Evaluation, probing and checkpointing are taken off the
    training clock.
    """

    timeline: Timeline

    def train(self) -> None:
        if self.global_step == 0 and self.data.test is not None:
            # The start model: where every arm's curves begin (Figure 3's first point, time-to-accuracy's baseline).
            self.sink.write({"step": 0, "epoch": 0.0, **self.evaluate()})
        self.timeline.start()
        super().train()

    def evaluate(self) -> dict[str, float]:
        began, cpu_began = time.perf_counter(), time.process_time()
        metrics = super().evaluate()
        self.timeline.exclude(time.perf_counter() - began, time.process_time() - cpu_began)
        self.timeline.probe(self.accelerator.unwrap_model(self.model), self.tokenizer, self.global_step)
        return metrics

    def save_checkpoint(self) -> Path:
        began, cpu_began = time.perf_counter(), time.process_time()
        path = super().save_checkpoint()
        self.timeline.exclude(time.perf_counter() - began, time.process_time() - cpu_began)
        return path


def train_orpo_arm(config: PipelineConfig, dataset_dir: str | Path, output_dir: str | Path) -> dict:
    """Train with the ORPO trainer (lambda from the config); returns resources.json's content."""
    import torch

    began = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "timeline.jsonl").unlink(missing_ok=True)
    recipe = TimedORPORecipe(config, dataset_dir, output_dir)
    recipe.timeline = make_timeline(config, dataset_dir, output_dir, phase="sft" if config.train.orpo_lambda == 0
                                    else "orpo")
    recipe.setup()
    try:
        recipe.train()
        result = recipe.export()
        device = recipe.accelerator.device
    finally:
        recipe.cleanup()
    return write_resources(output_dir, wall_seconds=time.perf_counter() - began,
                           train_seconds=recipe.timeline.train_seconds(),
                           train_cpu_seconds=recipe.timeline.train_cpu_seconds(), peak_memory_mb=peak_memory_mb(device),
                           device=str(device if isinstance(device, torch.device) else device),
                           steps=result.global_step)


def train_dpo_arm(config: PipelineConfig, dataset_dir: str | Path, sft_dir: str | Path, output_dir: str | Path) -> dict:
    """The DPO phase after the SFT arm; resources.json holds both phases (time added, memory the larger)."""
    import torch

    from orpo.ablation.dpo import train_dpo

    began = time.perf_counter()
    result, dpo_seconds, dpo_cpu_seconds = train_dpo(config, dataset_dir, sft_dir, output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sft = read_resources(Path(sft_dir))
    dpo = {"wall_seconds": time.perf_counter() - began, "train_seconds": dpo_seconds,
           "train_cpu_seconds": dpo_cpu_seconds,
           "peak_memory_mb": peak_memory_mb(device), "steps": result.global_step}
    resources = write_resources(
        Path(output_dir),
        wall_seconds=float(sft.get("wall_seconds", 0.0)) + dpo["wall_seconds"],
        train_seconds=float(sft.get("train_seconds", 0.0)) + dpo_seconds,
        train_cpu_seconds=float(sft.get("train_cpu_seconds", 0.0)) + dpo_cpu_seconds,
        peak_memory_mb=max(float(sft.get("peak_memory_mb", 0.0)), dpo["peak_memory_mb"]),
        device=str(device), steps=int(sft.get("steps", 0)) + result.global_step,
    )
    _add_phases(Path(output_dir), sft, dpo)
    return resources


def _add_phases(output_dir: Path, sft: dict, dpo: dict) -> None:
    import json

    from orpo.ablation.timeline import RESOURCES_JSON

    path = output_dir / RESOURCES_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    data["phases"] = {"sft": sft, "dpo": dpo}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orpo.ablation.train_arm", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the arm's resolved pipeline config (YAML)")
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--sft-dir", help="the SFT arm's output directory: run the DPO phase on top of it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.sft_dir:
            resources = train_dpo_arm(config, args.dataset_dir, args.sft_dir, args.output_dir)
        else:
            resources = train_orpo_arm(config, args.dataset_dir, args.output_dir)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    log.info("arm done: %.0f s training, %.0f s wall, peak memory %.0f MB", resources["train_seconds"],
             resources["wall_seconds"], resources["peak_memory_mb"])


if __name__ == "__main__":
    main()
