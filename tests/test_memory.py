"""orpo.memory: the training process's allocator environment, the `orpo train` re-exec, the step-boundary release."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from orpo import memory
from orpo.errors import UsageError

TCMALLOC = "libtcmalloc_minimal.so.4"


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*memory.USER_ALLOCATOR_KEYS, memory.MARKER, memory.ALLOCATOR_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(memory, "is_glibc", lambda: True)


@pytest.fixture
def with_tcmalloc(clean_env, monkeypatch):
    monkeypatch.setattr(memory, "find_tcmalloc", lambda: TCMALLOC)


@pytest.fixture
def without_tcmalloc(clean_env, monkeypatch):
    monkeypatch.setattr(memory, "find_tcmalloc", lambda: None)


def test_tcmalloc_is_preloaded_when_installed(with_tcmalloc):
    env = memory.training_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": TCMALLOC, **memory.TCMALLOC_QUIET, memory.MARKER: "1"}


def test_glibc_thresholds_without_tcmalloc(without_tcmalloc, caplog):
    with caplog.at_level(logging.INFO, logger="orpo.memory"):
        env = memory.training_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": memory.GLIBC_TUNABLES, memory.MARKER: "1"}
    assert "libtcmalloc-minimal4" in caplog.text  # says how to get both memory and speed


@pytest.mark.parametrize(("choice", "expected"), [
    ("glibc-thresholds", {"GLIBC_TUNABLES": memory.GLIBC_TUNABLES}),
    ("system", {}),
    ("tcmalloc", {"LD_PRELOAD": TCMALLOC, **memory.TCMALLOC_QUIET}),
])
def test_the_allocator_can_be_chosen(with_tcmalloc, choice, expected):
    env = memory.training_environment({memory.ALLOCATOR_ENV: choice})
    assert env == {memory.ALLOCATOR_ENV: choice, **expected, memory.MARKER: "1"}


def test_a_missing_or_unknown_allocator_is_a_usage_error(without_tcmalloc):
    with pytest.raises(UsageError, match="apt-get install libtcmalloc-minimal4"):
        memory.training_environment({memory.ALLOCATOR_ENV: "tcmalloc"})
    with pytest.raises(UsageError, match="ORPO_ALLOCATOR='jemalloc' is not one of auto, tcmalloc"):
        memory.training_environment({memory.ALLOCATOR_ENV: "jemalloc"})


@pytest.mark.parametrize("key", ["GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                                 "MALLOC_CONF"])
def test_users_allocator_settings_win(with_tcmalloc, key):
    env = memory.training_environment({key: "users-own"})
    assert env == {key: "users-own", memory.MARKER: "1"}  # nothing of ours beside the user's choice


def test_nothing_is_added_off_glibc(with_tcmalloc, monkeypatch):
    monkeypatch.setattr(memory, "is_glibc", lambda: False)
    assert memory.training_environment({}) == {memory.MARKER: "1"}


def test_reexec_only_for_train_and_only_once(with_tcmalloc, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    memory.reexec_for_training(["run", "--config", "c.yaml"])
    memory.reexec_for_training(["-v", "config", "show"])
    assert calls == []
    memory.reexec_for_training(["-v", "train", "--config", "c.yaml"])
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == TCMALLOC and env[memory.MARKER] == "1"
    monkeypatch.setenv(memory.MARKER, "1")  # the restarted process
    memory.reexec_for_training(["train"])
    assert len(calls) == 1


@pytest.mark.parametrize(("key", "value"), [("GLIBC_TUNABLES", "glibc.malloc.arena_max=2"),
                                            (memory.ALLOCATOR_ENV, "system")])
def test_no_reexec_when_there_is_nothing_to_add(with_tcmalloc, monkeypatch, key, value):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setenv(key, value)
    memory.reexec_for_training(["train"])
    assert calls == []


def _clean_child_env() -> dict[str, str]:
    drop = (*memory.USER_ALLOCATOR_KEYS, memory.MARKER, memory.ALLOCATOR_ENV)
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.skipif(not memory.is_glibc(), reason="the re-exec happens on glibc only")
def test_real_reexec_runs_twice_then_stops():
    code = ("import os; from orpo.memory import reexec_for_training; "
            "print(os.environ.get('LD_PRELOAD'), os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "reexec_for_training(['train'])")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_child_env(), capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    settings = memory.allocator_settings("auto")
    assert out == ["None None", f"{settings.get('LD_PRELOAD')} {settings.get('GLIBC_TUNABLES')}"]


@pytest.mark.skipif(not memory.is_glibc() or memory.find_tcmalloc() is None,
                    reason="needs tcmalloc installed (make installs libtcmalloc-minimal4 where it can)")
def test_under_tcmalloc_freed_memory_is_kept_for_reuse_and_released_at_step_boundaries():
    """What the training loop relies on: freed buffers stay with the allocator (no fresh pages next step) until
    release_free_memory() hands them back."""
    code = textwrap.dedent("""
        import os
        from orpo import memory
        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        assert memory.allocator_in_use() == "tcmalloc", memory.allocator_in_use()
        before = rss_mb()
        buffers = [bytearray(b"x" * (5 << 20)) for _ in range(60)]  # 300 MB of activation-sized buffers
        del buffers
        kept = rss_mb() - before
        memory.release_free_memory()
        print(round(kept), round(rss_mb() - before))
    """)
    env = memory.training_environment(_clean_child_env())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    kept, after_release = map(int, out)
    assert kept > 250 and after_release < 50


def test_flow_training_subprocess_gets_the_environment(with_tcmalloc, monkeypatch, tmp_path):
    from orpo.config import load_config
    from tasks import train as train_task

    seen = {}

    def fake_stream(command, log, *, env=None, timeout_s=None):
        seen.update(command=command, env=env)
        return 1, ["boom"]

    monkeypatch.setattr(train_task, "stream_subprocess", fake_stream)
    config = load_config(None, [f"workdir={tmp_path}"])
    with pytest.raises(train_task.TrainingFailed):
        train_task._train(config, tmp_path / "data", tmp_path / "out", logging.getLogger("test"))
    assert "orpo.train" in seen["command"]
    assert seen["env"]["LD_PRELOAD"] == TCMALLOC
    assert seen["env"][memory.MARKER] == "1" and seen["env"]["PYTHONUNBUFFERED"] == "1"


def test_release_is_glibcs_malloc_trim_without_tcmalloc():
    if not memory.is_glibc() or "LD_PRELOAD" in os.environ:
        pytest.skip("runs in a plain glibc process")
    assert memory.allocator_in_use() == "glibc"
    memory.release_free_memory()
