"""Fan work out to forked processes in a way that cannot hang.

`multiprocessing.Pool` hung `make demo`: its workers ignore SIGTERM (a process-group
signal is the main process's to handle), but `Pool.terminate()`, which its `with` block
calls, stops workers with SIGTERM and then waits for them without a bound, while it
holds the task-queue lock a worker may be waiting on. Here no lock is shared at all:
worker k computes items k, k + jobs, k + 2 jobs, ... (inherited through fork, never
pickled) and sends each result back through a pipe of its own. The main process reads
the pipes in item order, so results come back in order, and every wait is on "this
pipe has data or this worker has exited", so a dead worker is an error that names it,
never a wait forever. Workers that are no longer needed (an error, a stop request, the
caller leaving the loop early) get SIGKILL, which they cannot ignore, and a worker whose
parent dies gets SIGKILL from the kernel, so none is ever left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import TypeVar

from echoic.errors import EchoicError

Item = TypeVar("Item")
Result = TypeVar("Result")

POLL_SECONDS = 0.25  # how often a wait for results looks at `should_stop`
EXIT_GRACE_SECONDS = 10.0  # a finished worker has this long to exit before SIGKILL
_PR_SET_PDEATHSIG = 1


class WorkerError(EchoicError):
    """A worker process raised or died; the message says which and how."""


def ignore_stop_signals() -> None:
    """For workers: a SIGTERM or SIGINT sent to the whole process group (a scheduler's
    preemption, a timeout, Ctrl-C) is the main process's to handle. It saves what it
    must and then stops the workers itself; workers dying first would turn a clean stop
    into a crash."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with_parent(parent: int) -> None:
    # Linux: the kernel sends SIGKILL to this worker when its parent exits, however it
    # exits (even by SIGKILL), so a worker that ignores SIGTERM is never orphaned.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def fork_map(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    jobs: int,
    *,
    initializer: Callable[[], None] | None = ignore_stop_signals,
    should_stop: Callable[[], bool] | None = None,
    name: str = "worker",
) -> Iterator[Result]:
    """Yields `function(item)` for every item, in order, computed by `jobs` forked
    processes (in this process when `jobs` <= 1; never more processes than items).

    `should_stop` is polled while waiting; when it returns True the workers are killed
    and the iteration ends early (the caller sees fewer results). A worker that raises
    or dies raises `WorkerError` here, with the worker's error or exit status.
    """
    if not items:
        return
    if jobs <= 1:
        for item in items:
            if should_stop is not None and should_stop():
                return
            yield function(item)
        return
    jobs = min(jobs, len(items))
    context = multiprocessing.get_context("fork")
    processes: list[multiprocessing.Process] = []
    pipes: list[Connection] = []
    finished = False
    try:
        for index in range(jobs):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_work,
                args=(function, items, index, jobs, sender, initializer, os.getpid()),
                name=f"echoic-{name}-{index}",
                daemon=True,
            )
            process.start()
            sender.close()  # the worker holds the only write end: its exit means EOF here
            processes.append(process)
            pipes.append(receiver)
        for position in range(len(items)):
            worker = position % jobs
            message = _receive(pipes[worker], processes[worker], should_stop, name)
            if message is None:
                return  # stop requested; `finally` kills the workers
            yield message
        finished = True
    finally:
        for process in processes:
            if finished:
                process.join(EXIT_GRACE_SECONDS)
            if process.is_alive():
                process.kill()  # SIGKILL: workers ignore SIGTERM
                process.join(EXIT_GRACE_SECONDS)
        for pipe in pipes:
            pipe.close()


def _receive(
    pipe: Connection,
    process: multiprocessing.Process,
    should_stop: Callable[[], bool] | None,
    name: str,
):
    """The next result from this worker; None when `should_stop` says so first."""
    while True:
        if should_stop is not None and should_stop():
            return None
        ready = wait([pipe, process.sentinel], timeout=POLL_SECONDS)
        if pipe in ready:
            try:
                status, payload = pipe.recv()
            except EOFError:
                break  # the worker exited without sending: see below
            if status == "error":
                raise WorkerError(f"{process.name}: {payload}")
            return payload
        if ready:  # the worker exited; a last message may still be in the pipe
            if pipe.poll():
                continue
            break
    process.join(EXIT_GRACE_SECONDS)
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    raise WorkerError(f"{process.name} ({name}) stopped before finishing its work: {how}{hint}")


def _work(function, items, index, jobs, sender, initializer, parent: int) -> None:
    _die_with_parent(parent)
    if initializer is not None:
        initializer()
    try:
        for position in range(index, len(items), jobs):
            try:
                result = ("ok", function(items[position]))
            except Exception as error:  # sent back and raised in the main process
                last = traceback.extract_tb(error.__traceback__)[-1]
                where = f"{os.path.basename(last.filename)}:{last.lineno}"
                result = ("error", f"{type(error).__name__}: {error} (at {where})")
            sender.send(result)
            if result[0] == "error":
                return
    except (BrokenPipeError, ConnectionResetError):
        return  # the main process stopped reading: nothing left to do
    finally:
        sender.close()
