"""Run independent jobs (one per shard) in forked worker processes, a few at a time.

Why processes: the page-cache copies of a merge are kernel work that one process does on one
core; shards are independent, so N processes write N shards at N cores' speed. Why fork: the
plan (adapter, headers) is inherited, nothing is pickled or re-read. And a worker that dies is
reported, not fatal: a base file truncated under a memory map kills the reader with SIGBUS,
which here becomes a one-line error while the parent removes the partial output.

Workers report progress and results through a pipe; they never print, never clean up (the
parent owns the output directory) and leave Ctrl-C to the parent, which kills them on any error.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from ...errors import FormatError, LoraToolsError

Job = TypeVar("Job")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def run_jobs(
    jobs: Sequence[Job],
    work: Callable[[Job, Callable[[int], None]], int],
    workers: int,
    describe: Callable[[Job], str],
    progress: Callable[[int], None] | None = None,
) -> list[int]:
    """work(job, progress) for every job, at most `workers` at once in forked processes (one
    after the other in this process where fork is unavailable). Returns each job's result, in job order.
    The first failure kills the other workers and is raised here."""
    report = progress or (lambda n: None)
    if not can_fork():
        return [work(job, report) for job in jobs]
    ctx = multiprocessing.get_context("fork")
    results: dict[int, int] = {}
    waiting = list(enumerate(jobs))
    running: dict[multiprocessing.connection.Connection, tuple[int, multiprocessing.Process]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max(1, workers):
                i, job = waiting.pop(0)
                receiver, sender = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(work, job, sender), daemon=True)
                with _signals_deferred():  # a stop between fork and bookkeeping would orphan a worker
                    proc.start()
                    running[receiver] = (i, proc)
                sender.close()  # the worker's end: EOF here once it exits
            for conn in multiprocessing.connection.wait(list(running)):
                i, proc = running[conn]
                try:
                    message = conn.recv()
                except EOFError:  # exited without a result: killed by a signal
                    proc.join()
                    raise _died(describe(jobs[i]), proc.exitcode) from None
                kind, *payload = message
                if kind == "progress":
                    report(payload[0])
                    continue
                del running[conn]
                conn.close()
                proc.join()
                if kind == "done":
                    results[i] = payload[0]
                elif kind == "raise":
                    raise payload[0]  # as raised in the worker: a LoraToolsError with its code, an OSError...
                else:
                    type_name, text = payload
                    raise RuntimeError(f"{type_name} while working on {describe(jobs[i])}: {text}")
    finally:
        for conn, (_, proc) in running.items():
            proc.kill()
            proc.join()
            conn.close()
    return [results[i] for i in range(len(jobs))]


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then act on the first one as usual.
    (Masking the signal in this thread is not enough: another thread, such as a BLAS worker,
    can receive it and Python then runs the handler here all the same.)"""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python
        if caught:
            signal.raise_signal(caught[0])


def _worker(work, job, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        result = work(job, lambda n: conn.send(("progress", n)))
        conn.send(("done", result))
    except BaseException as exc:  # raised again by the parent
        try:
            conn.send(("raise", exc))
        except Exception:  # an exception that does not pickle: its name and first line
            conn.send(("crash", type(exc).__name__, (str(exc).strip().splitlines() or [""])[0]))
    finally:
        conn.close()


def _died(what: str, exitcode: int | None) -> LoraToolsError:
    if exitcode == -signal.SIGBUS:
        return FormatError(f"{what}: changed on disk while it was being read (truncated?); nothing was written", code="input-changed")
    if exitcode == -signal.SIGKILL:
        return LoraToolsError(f"the worker for {what} was killed (out of memory? try --workers 1); nothing was written", code="worker-killed")
    return LoraToolsError(f"the worker for {what} stopped unexpectedly (exit status {exitcode}); nothing was written", code="worker-died")
