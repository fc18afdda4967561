"""Checkpoints: `output_dir/checkpoints/step-N`, written whole or not at all, verified before resuming.

A checkpoint is `accelerator.save_state` (model or LoRA weights, optimizer, schedule, RNG; shards under
FSDP/ZeRO) plus trainer_state.json, written under `.step-N.partial` and renamed when complete. Before a
resume the newest one is verified (every safetensors file's header parses and its data is all there, every
torch-saved file's zip directory reads, trainer_state.json parses); a corrupt one is moved aside to
`step-N.corrupt` with a warning naming the bad file, and the previous one is tried.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.config import ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# Files accelerate writes with torch.save (zip archives): optimizer, RNG states, registered objects, scaler.
_TORCH_SAVED = (".bin", ".pkl", ".pt")


class CheckpointError(ConfigError):
    """No checkpoint of an output directory can be resumed from; the message says how to start over."""


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (step-N holding trainer_state.json), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def remove_partial_checkpoints(root: Path) -> None:
    if not root.is_dir():
        return
    for path in root.glob(".step-*.partial"):
        log.info("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_trainable_weights_only(accelerator: Accelerator) -> None:
    """LoRA checkpoints keep only the trainable weights: megabytes instead of the whole frozen base.

    The frozen weights are whatever the base model loads as, so leaving them out loses nothing. Loading
    checks that the file holds exactly the trainable weights and nothing else.
    """
    from safetensors.torch import load_file

    def trainable(model) -> dict[str, torch.Tensor]:
        # Names of the unwrapped model (no DDP "module." prefix), so a checkpoint does not depend on the wrapper.
        inner = accelerator.unwrap_model(model)
        return {name: param.detach() for name, param in inner.named_parameters() if param.requires_grad}

    def save_hook(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            state.clear()
            state.update(trainable(model))

    def load_hook(models, input_dir) -> None:
        for index, model in enumerate(list(models)):
            path = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            expected = trainable(model)
            state = load_file(str(path), device=str(next(iter(expected.values())).device))
            if set(state) != set(expected):
                missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
                raise RuntimeError(
                    f"{path} does not hold this model's trainable weights (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); was it written with another LoRA config? Use a new output directory."
                )
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; accelerate must not load it again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)



def save_checkpoint(accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """accelerator.save_state into `.step-N.partial` with `state` as trainer_state.json (written last), then
    renamed to step-N; only the newest `keep` checkpoints stay. Every process calls it."""
    final = root / f"step-{step}"
    partial = root / f".step-{step}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)  # created on the first save: a failed setup leaves no empty dir
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every process: RNG states per process, shards under FSDP/ZeRO
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():  # from an earlier attempt that got past this step
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (naming the file), or None when it looks whole.

    Reads headers and directories only (a few KB per file), never the tensors.
    """
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{path / TRAINER_STATE} holds no integer global_step"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path / TRAINER_STATE} is unreadable ({exc})"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in _TORCH_SAVED:
            problem = None if zipfile.is_zipfile(file) else "is not a complete torch.save archive"
        else:
            problem = None  # other shard formats (FSDP's .distcp) are checked by their loader
        if problem:
            return f"{file} {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then data up to the largest end offset."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size - 8:
                return f"is truncated ({size} bytes; its header alone claims {header_length})"
            header = json.loads(handle.read(header_length))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"has an unreadable header ({exc})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def resumable_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under `root`, setting aside corrupt newer ones (main process only).

    None when there is none at all; CheckpointError when every one is corrupt.
    """
    candidates = list_checkpoints(root)
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
        log.warning("checkpoint %s is corrupt: %s; moved it to %s and trying the previous one", path.name, problem,
                    aside)
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint in {root}: all {len(candidates)} were corrupt and moved aside (*.corrupt, "
            f"see the warnings above). To start over, delete {root.parent} or pass a new --output-dir"
        )
    return None
