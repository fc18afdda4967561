"""orpo.memory: the training process's allocator environment, the `orpo train` re-exec, the step-boundary trim."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from orpo import memory


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*memory.USER_ALLOCATOR_KEYS, memory.MARKER):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(memory, "is_glibc", lambda: True)


def test_training_environment_adds_tunables_and_marker(clean_env):
    env = memory.training_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": memory.GLIBC_TUNABLES, memory.MARKER: "1"}


@pytest.mark.parametrize("key", ["GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"])
def test_users_allocator_settings_win(clean_env, key):
    env = memory.training_environment({key: "users-own"})
    assert env[key] == "users-own"
    assert env.get("GLIBC_TUNABLES", "users-own") == "users-own"  # ours not added beside the user's choice


def test_no_tunables_off_glibc(clean_env, monkeypatch):
    monkeypatch.setattr(memory, "is_glibc", lambda: False)
    assert "GLIBC_TUNABLES" not in memory.training_environment({})


def test_reexec_only_for_train_and_only_once(clean_env, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    memory.reexec_for_training(["run", "--config", "c.yaml"])
    memory.reexec_for_training(["-v", "config", "show"])
    assert calls == []
    memory.reexec_for_training(["-v", "train", "--config", "c.yaml"])
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == memory.GLIBC_TUNABLES and env[memory.MARKER] == "1"
    monkeypatch.setenv(memory.MARKER, "1")  # the restarted process
    memory.reexec_for_training(["train"])
    assert len(calls) == 1


def test_reexec_leaves_users_settings_alone(clean_env, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    memory.reexec_for_training(["train"])
    assert calls == []


@pytest.mark.skipif(not memory.is_glibc(), reason="the re-exec happens on glibc only")
def test_real_reexec_runs_twice_then_stops():
    code = ("import os; from orpo.memory import reexec_for_training; "
            "print(os.environ.get('GLIBC_TUNABLES'), flush=True); reexec_for_training(['train'])")
    env = {k: v for k, v in os.environ.items() if k not in (*memory.USER_ALLOCATOR_KEYS, memory.MARKER)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    assert out == ["None", memory.GLIBC_TUNABLES]


def test_flow_training_subprocess_gets_the_environment(clean_env, monkeypatch, tmp_path):
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
    assert seen["env"]["GLIBC_TUNABLES"] == memory.GLIBC_TUNABLES
    assert seen["env"][memory.MARKER] == "1" and seen["env"]["PYTHONUNBUFFERED"] == "1"


def test_trim_is_a_noop_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "is_glibc", lambda: False)
    memory._malloc_trim.cache_clear()
    try:
        assert memory._malloc_trim() is None
        memory.release_free_memory()
    finally:
        memory._malloc_trim.cache_clear()


@pytest.mark.skipif(not memory.is_glibc(), reason="malloc_trim is glibc's")
def test_trim_calls_malloc_trim_on_glibc():
    memory._malloc_trim.cache_clear()
    assert memory._malloc_trim() is not None
    memory.release_free_memory()
