"""Worker processes that validate, binarize and decontaminate chunks of large JSONL files in parallel.

Why not `multiprocessing` / `concurrent.futures`: their spawn and forkserver start methods import the
caller's `__main__` again in every worker (a script without a main guard would run once per worker), and
fork is unsafe once threads exist (tokenizers, datasets). Plain subprocesses that read pickled tasks on
stdin and write pickled results on stdout avoid both, at the same speed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.data.readers import DataPreparationError, RawItem, _count_lines, iter_jsonl

if TYPE_CHECKING:
    from orpo.data.binarize import Outcome, RecordProcessor

PARALLEL_CHUNK_BYTES = 8 << 20
MAX_AUTO_WORKERS = 4  # each worker holds ~170 MB; more rarely pays on this I/O-and-parse load

_WORKER_PROCESSOR: RecordProcessor | None = None


@dataclass(frozen=True)
class _ChunkResult:
    outcomes: list[Outcome]
    lines: int
    nbytes: int


def _process_chunk(path: str, start: int, end: int) -> _ChunkResult:
    from orpo.data.binarize import WRITE_BATCH_ROWS

    assert _WORKER_PROCESSOR is not None
    outcomes: list[Outcome] = []
    batch: list[RawItem] = []
    for item in iter_jsonl(Path(path), start, end):
        batch.append(item)
        if len(batch) >= WRITE_BATCH_ROWS:
            outcomes += _WORKER_PROCESSOR.process(batch)
            batch = []
    outcomes += _WORKER_PROCESSOR.process(batch)
    return _ChunkResult(outcomes, _count_lines(Path(path), start, end), end - start)


def _line_aligned_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as handle:
        while starts[-1] + chunk_bytes < size:
            handle.seek(starts[-1] + chunk_bytes)
            handle.readline()  # to the start of the next line
            if handle.tell() >= size:
                break
            starts.append(handle.tell())
    return list(zip(starts, starts[1:] + [size], strict=True))


class WorkerPool:
    """Worker subprocesses (running `_worker_main`) that process chunks of large JSONL files.

    Plain subprocesses talking pickles over pipes, not multiprocessing: they never re-import the caller's
    __main__ (a script without a main guard would otherwise run again in every worker). Chunk i goes to
    worker i % n and each worker answers in order, so results are read back in input order and the output
    is byte-identical to the single-process pass.
    """

    IN_FLIGHT_PER_WORKER = 2

    def __init__(self, processor: RecordProcessor, workers: int) -> None:
        self.processor = processor
        self.workers = workers
        self._procs: list[Any] = []
        self._idle = True  # every result sent for has been read

    def _start(self) -> None:
        import pickle
        import subprocess

        import orpo

        env = dict(os.environ)
        package_root = str(Path(orpo.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        for _ in range(self.workers):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-c", "from orpo.data.pool import _worker_main; _worker_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            ))
        # Start them all before sending: a send blocks until that worker has started and reads it.
        for proc in self._procs:
            pickle.dump(self.processor, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()

    def outcomes(self, path: Path) -> Iterator[tuple[list[Outcome], int]]:
        import pickle

        if not self._procs:
            self._start()
        ranges = _line_aligned_ranges(path, PARALLEL_CHUNK_BYTES)
        procs = self._procs

        def send(index: int) -> None:
            proc = procs[index % len(procs)]
            pickle.dump((str(path), *ranges[index]), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()

        self._idle = False
        sent = min(len(ranges), self.IN_FLIGHT_PER_WORKER * len(procs))
        for index in range(sent):
            send(index)
        base = 0
        for index in range(len(ranges)):
            proc = procs[index % len(procs)]
            try:
                status, payload = pickle.load(proc.stdout)
            except EOFError:
                raise DataPreparationError(
                    f"a data worker process exited (code {proc.poll()}) while reading {path}; see its error "
                    "above, or run in one process with ORPO_DATA_WORKERS=1"
                ) from None
            if status != "ok":
                raise DataPreparationError(f"data worker failed on {path} bytes {ranges[index]}:\n{payload}")
            if sent < len(ranges):
                send(sent)
                sent += 1
            for outcome in payload.outcomes:
                outcome.line += base
                # Pairs too: the length limit and dedupe, after this, name the records they drop.
                outcome.location = f"{path}:{outcome.line}"
            base += payload.lines
            yield payload.outcomes, payload.nbytes
        self._idle = True

    def close(self) -> None:
        for proc in self._procs:
            if self._idle:
                proc.stdin.close()  # end of tasks: the worker exits
            else:
                proc.kill()  # it may be blocked writing a result nobody will read
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a worker that does not exit is killed, never waited on forever
                proc.kill()
            for stream in (proc.stdin, proc.stdout):
                if stream and not stream.closed:
                    stream.close()
        self._procs = []


def _worker_main() -> None:
    """Entry point of a worker process: a RecordProcessor, then (path, start, end) tasks, on stdin."""
    import pickle
    import traceback

    global _WORKER_PROCESSOR
    tasks = sys.stdin.buffer
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the result stream
    _WORKER_PROCESSOR = pickle.load(tasks)
    while True:
        try:
            path, start, end = pickle.load(tasks)
        except EOFError:
            return
        try:
            reply = ("ok", _process_chunk(path, start, end))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it with the file and range
            reply = ("error", traceback.format_exc())
        pickle.dump(reply, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()


def worker_count(requested: int | None) -> int:
    if requested is not None:
        return max(1, requested)
    if os.environ.get("ORPO_DATA_WORKERS"):
        return max(1, int(os.environ["ORPO_DATA_WORKERS"]))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_AUTO_WORKERS)
