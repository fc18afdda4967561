"""The memory allocator of a training process, so that its peak RSS follows its live memory.

A CPU training step allocates and frees thousands of activation-sized buffers (a SmolLM2 LoRA step at
1024 tokens: ~2,300 of 5.3 MB and ~600 of 14 MB, 22 GB in all). glibc's default malloc serves them from
its heap (its mmap threshold adapts up to 32 MB) and fragments it: that step, whose tensors peak at
1.65 GB, showed 4 GB of RSS, which is what a laptop's OOM killer sees. Lower fixed glibc thresholds give
those buffers their own mappings instead, which keeps the peak down but pays for fresh zeroed pages on
every allocation (+16-36% per step). tcmalloc reuses freed buffers of the same size class without
returning them, and gives free memory back only when asked (at step boundaries, `release_free_memory`):
the same step peaks at 1.04x its live memory in the time it takes under glibc's defaults
(measurements: README, Benchmarks).

So the launcher (`orpo train`, which restarts itself once; the flow's `accelerate launch` subprocess)
starts training with `ORPO_ALLOCATOR` (default `auto`):
- `auto`: tcmalloc preloaded when the system has it (Debian/Ubuntu `libtcmalloc-minimal4`, conda
  `gperftools`; `make` installs it where it can), else glibc with fixed thresholds;
- `tcmalloc` (an error when it is missing), `glibc-thresholds`, or `system` (nothing added).
A user's own LD_PRELOAD, GLIBC_TUNABLES or MALLOC_* variables always win: then nothing is added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from orpo.errors import UsageError

log = logging.getLogger(__name__)

# Set in the environment of a process that was started with the training environment (re-exec guard).
MARKER = "ORPO_TRAINING_ENV"
ALLOCATOR_ENV = "ORPO_ALLOCATOR"
ALLOCATOR_CHOICES = ("auto", "tcmalloc", "glibc-thresholds", "system")
# glibc without tcmalloc: allocations of at least 4 MB get their own mapping, returned when freed; smaller
# ones come from the heap, whose free top is returned above 8 MB. Of the thresholds measured (4, 8, 32 MB
# and glibc's adaptive default) only 4 MB kept the peak within 1.3x of the live one (README).
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=8388608"
# tcmalloc's minimal build (no heap profiler), then the full one; sonames as ldconfig and conda ship them.
TCMALLOC_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
# tcmalloc reports every allocation over 1 GB on stderr by default (loading a 7B checkpoint makes some).
TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
# Any of these set by the user means the user chose the allocator's behaviour.
USER_ALLOCATOR_KEYS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_CONF")


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@functools.cache
def find_tcmalloc() -> str | None:
    """Path (or soname the dynamic loader resolves) of an installed tcmalloc, or None.

    This environment's own lib directory first (conda's `gperftools`), then the loader's cache (ldconfig).
    """
    for name in TCMALLOC_LIBRARIES:
        candidate = Path(sys.prefix) / "lib" / name
        if candidate.is_file():
            return str(candidate)
    for stem in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(stem)
        if found in TCMALLOC_LIBRARIES:
            return found
    return None


def allocator_settings(choice: str) -> dict[str, str]:
    """The environment variables that start a process with allocator `choice` (see ALLOCATOR_CHOICES)."""
    if choice not in ALLOCATOR_CHOICES:
        raise UsageError(f"{ALLOCATOR_ENV}={choice!r} is not one of {', '.join(ALLOCATOR_CHOICES)}")
    if choice == "system" or not is_glibc():
        return {}
    if choice in ("auto", "tcmalloc"):
        library = find_tcmalloc()
        if library is not None:
            return {"LD_PRELOAD": library, **TCMALLOC_QUIET}
        if choice == "auto":
            log.info("no tcmalloc found: training under glibc with fixed malloc thresholds, which keeps peak "
                     "memory down at some CPU time per step; install libtcmalloc-minimal4 (Debian/Ubuntu) or "
                     "gperftools (conda) for both")
        else:
            raise UsageError(f"{ALLOCATOR_ENV}=tcmalloc, but no tcmalloc library was found "
                             f"({' or '.join(TCMALLOC_LIBRARIES)}): install it (Debian/Ubuntu: apt-get install "
                             "libtcmalloc-minimal4; conda: conda install gperftools) or choose "
                             f"{ALLOCATOR_ENV}=auto")
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES}


def training_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the allocator settings for a training process."""
    env = dict(os.environ if base is None else base)
    if not any(env.get(key) for key in USER_ALLOCATOR_KEYS):
        env.update(allocator_settings(env.get(ALLOCATOR_ENV) or "auto"))
    env[MARKER] = "1"
    return env


def reexec_for_training(argv: Sequence[str]) -> None:
    """Replace this process by itself under `training_environment()` when `argv` is an `orpo train` command.

    The dynamic loader reads LD_PRELOAD, and glibc its tunables, once, at start-up, so a process can only
    get them by being started with them. Does nothing when already started that way (MARKER), for other
    commands, or when there is nothing to add.
    """
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command != "train" or os.environ.get(MARKER):
        return
    env = training_environment()
    added = {key: value for key, value in env.items() if key != MARKER and os.environ.get(key) != value}
    if not added:
        return  # the user's allocator settings stand, or there are none to add here
    log.debug("restarting with %s", added)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.cache
def _loaded_allocator() -> tuple[str, Callable[[], object] | None]:
    """The allocator this process runs on (tcmalloc, glibc or other) and its "return free memory" call."""
    if not sys.platform.startswith("linux"):
        return "other", None
    process = ctypes.CDLL(None)  # the whole process's symbols: a preloaded allocator's come first
    tcmalloc = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if tcmalloc is not None:
        tcmalloc.argtypes, tcmalloc.restype = [], None
        return "tcmalloc", tcmalloc
    trim = getattr(process, "malloc_trim", None) if is_glibc() else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return "glibc", functools.partial(trim, 0)
    return "other", None


def release_free_memory() -> None:
    """Return the allocator's free pages to the system: tcmalloc's ReleaseFreeMemory, glibc's malloc_trim;
    a no-op elsewhere."""
    release = _loaded_allocator()[1]
    if release is not None:
        release()


def allocator_in_use() -> str:
    """What this process runs on, for logs and benchmark records: tcmalloc, glibc or other."""
    return _loaded_allocator()[0]
