"""Allocator settings for a training process, so that its peak RSS follows its live memory.

A CPU training step allocates and frees hundreds of activation-sized buffers. With glibc's default
malloc the freed ones stay in the process as heap (its mmap threshold adapts upward to 32 MB, so most
of them come from the brk heap, and freed holes in the middle of that heap are never returned): a
SmolLM2 LoRA step whose tensors peak at 1.7 GB showed 5.5 GB of RSS, which is what a laptop's OOM
killer sees. The launcher (`orpo train`, the flow's `accelerate launch` subprocess) therefore starts
training with fixed malloc thresholds, and the training loop returns free heap at each step boundary.
That brings the step's peak to ~1.1x the live peak (from ~2.4x), at some CPU time: see README, Benchmarks.
A user's own GLIBC_TUNABLES, MALLOC_*_ variables or LD_PRELOAD always win: then nothing is added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

# Set in the environment of a process that was started with the training environment (re-exec guard).
MARKER = "ORPO_TRAINING_ENV"
# Allocations of at least 4 MB get their own mapping, returned to the system when freed; smaller ones
# come from the heap, whose free top is returned above 8 MB. SmolLM2 LoRA at 1024 tokens, one thread, peak
# RSS over the steps against a live peak of 1669 MB, and CPU s/step (one run each, machine under load):
# default + trim 3991 MB / 30.6 s, 8 MB thresholds + trim 3068 / 32.1, the same + glibc.malloc.hugetlb=1
# 2895 / 32.1, 4 MB thresholds + trim 1821 / 35.3; glibc's 32 MB bound and mimalloc kept 2-3x (README).
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=8388608"
# Any of these set by the user means the user chose the allocator's behaviour.
USER_ALLOCATOR_KEYS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def training_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the allocator settings for a training process."""
    env = dict(os.environ if base is None else base)
    if is_glibc() and not any(env.get(key) for key in USER_ALLOCATOR_KEYS):
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    env[MARKER] = "1"
    return env


def reexec_for_training(argv: Sequence[str]) -> None:
    """Replace this process by itself under `training_environment()` when `argv` is an `orpo train` command.

    glibc reads its tunables once, at start-up, so a process can only get them by being started with them.
    Does nothing when already started that way (MARKER), on other platforms, or for other commands.
    """
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command != "train" or os.environ.get(MARKER) or not is_glibc():
        return
    env = training_environment()
    if env.get("GLIBC_TUNABLES") != GLIBC_TUNABLES:
        return  # the user's allocator settings stand; nothing to restart for
    log.debug("restarting with %s", GLIBC_TUNABLES)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.cache
def _malloc_trim():
    if not is_glibc():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
