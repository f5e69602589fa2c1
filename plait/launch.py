"""Run a function on N local workers with torch.distributed initialised.

``launch(fn, world_size, *args)`` starts ``world_size`` processes, initialises a process group in
each (gloo on CPU, NCCL when every worker has its own GPU), calls ``fn(*args)`` and returns the
per-rank return values as a list. Inside a job that torchrun started it joins that job instead, so
the same code runs on one machine or many.

Failure is the part worth reading: each worker reports back through its own pipe, and the parent
watches those pipes and every worker's process sentinel at once. The first worker that raises or
dies (SIGKILL included) brings the whole job down: the others are terminated (then killed after a
short grace period), reaped, and :class:`WorkerError` is raised naming the rank and carrying its
traceback. A collective that never completes fails after ``timeout`` seconds, the process-group
timeout, instead of hanging; and a watchdog (:mod:`plait.heartbeat`) names a worker that stops
making progress for longer than ``timeout`` (stopped, stuck, or deadlocked) with its last action,
and ends the job.

The workers never outlive their launcher: each holds the read end of a pipe whose only write end
the launcher holds, and a thread in the worker kills it when that pipe closes -- which the kernel
does whatever ends the launcher, SIGKILL included. SIGTERM (as sent by ``timeout``, Slurm or
docker) stops the workers as Ctrl-C does, and the launcher then exits with status 143. No
named semaphore is used, so nothing is left in ``/dev/shm`` either.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from plait import heartbeat
from plait.alloc import keep_freed_memory

__all__ = ["launch", "WorkerError", "Terminated", "default_backend"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


class WorkerError(RuntimeError):
    """A worker of a :func:`launch` job raised or died.

    Attributes:
        rank: the global rank of the first worker that failed.
        worker_traceback: its formatted traceback (or how it died).
    """

    def __init__(self, rank: int, message: str, worker_traceback: str = ""):
        self.rank = rank
        self.worker_traceback = worker_traceback
        text = f"worker rank {rank} {message}"
        if worker_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{worker_traceback.rstrip()}"
        super().__init__(text)


def default_backend(world_size: int) -> str:
    """NCCL when CUDA is available with a GPU per worker, otherwise gloo."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _in_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def torchrun_world_size() -> int | None:
    """The world size torchrun started this process in, or None outside torchrun."""
    return int(os.environ["WORLD_SIZE"]) if _in_torchrun() else None


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout: float = 120.0,
    grace: float = 3.0,
    threads_per_worker: int | None = None,
    host: str = "127.0.0.1",
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` workers and return their results in rank order.

    Args:
        fn: a picklable (module-level) function; it runs with the default process group ready.
        world_size: number of workers (>= 1).
        backend: ``"gloo"``, ``"nccl"`` or None to choose (:func:`default_backend`).
        timeout: seconds a collective may wait before it fails (the process-group timeout).
        grace: seconds between asking the surviving workers to stop and killing them, once one
            has failed; ``launch`` raises within about this long after the failure.
        threads_per_worker: torch intra-op threads per worker; default shares the CPU cores.
        host: rendezvous address; loopback by default.

    Returns:
        ``[fn(*args) on rank 0, ..., on rank world_size-1]``.

    Raises:
        WorkerError: a worker raised or died; names its rank and carries its traceback.

    Example::

        def hello(x):
            return dist.get_rank() * x

        plait.launch(hello, 2, 10)  # [0, 10]
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if _in_torchrun():
        return _join_torchrun(fn, args, backend, timeout)
    backend = backend or default_backend(world_size)
    if threads_per_worker is None:
        threads_per_worker = max(1, (os.cpu_count() or 1) // world_size)

    # The parent hosts the rendezvous store on a port the OS picks (no free-port race), listening
    # on ``host`` only: TCPStore alone would listen on every interface.
    listener = _listen(host)
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
        master_listen_fd=listener.detach(),  # the store owns and closes it
    )
    ctx = _context()
    slots = heartbeat.Slots(ctx, world_size)
    alive_r, alive_w = ctx.Pipe(duplex=False)  # closes when this process ends, however
    readers, procs = [], []
    with _terminate_as_interrupt():
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_worker,
                    args=(
                        fn,
                        args,
                        rank,
                        world_size,
                        backend,
                        host,
                        store.port,
                        timeout,
                        threads_per_worker,
                        writer,
                        alive_r,
                        slots,
                    ),
                    name=f"plait-rank{rank}",
                )
                p.start()
                writer.close()  # the worker holds it now: EOF here once it exits
                readers.append(reader)
                procs.append(p)
            alive_r.close()
            watchdog = heartbeat.Watchdog(slots, [p.pid for p in procs], timeout)
            return _collect(procs, readers, grace, watchdog)
        finally:
            _stop(procs, grace)
            for r in readers:
                r.close()
            alive_w.close()
            del store


class Terminated(SystemExit):
    """The launcher got SIGTERM: its workers were stopped; exits with status 143 (128 + 15)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def _terminate_as_interrupt():
    """While the job runs, SIGTERM unwinds the launcher (stopping its workers) as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        print("plait: SIGTERM: stopping the workers", file=sys.stderr, flush=True)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# What the forkserver imports once, so that workers forked from it start without importing it.
_PRELOAD = ["torch", "torch.distributed", "plait", "plait.train.loop", "plait.pipeline.runtime"]


def _preload() -> list[str]:
    """The base preload, plus the Hugging Face model code this process has loaded: workers that
    build the same model would otherwise each import it again (seconds per worker)."""
    hf = sorted(
        m
        for m in sys.modules
        if m == "transformers.modeling_utils"
        or (m.startswith("transformers.models.") and ".modeling_" in m)
    )
    return _PRELOAD + hf


def _listen(host: str) -> socket.socket:
    """A listening socket on ``host`` and a port the OS picks, for the rendezvous store."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    return sock


def _context() -> mp.context.BaseContext:
    # forkserver: workers are forked from a clean server that has imported torch once, so they
    # start fast and never inherit a parent's OpenMP state (which can hang forked children).
    if sys.platform == "linux":
        ctx = mp.get_context("forkserver")
        want = _preload()
        from multiprocessing import forkserver

        server = forkserver._forkserver
        running = getattr(server, "_forkserver_pid", None) is not None
        have = set(getattr(server, "_preload_modules", None) or ())
        if running and not set(want) <= have and hasattr(server, "_stop"):
            # No worker of an earlier launch is alive here (launch waits for all of them), so
            # the server can be restarted with the model code this job's workers need.
            server._stop()
        ctx.set_forkserver_preload(want)
        return ctx
    return mp.get_context("spawn")


def _collect(procs, readers, grace: float, watchdog: heartbeat.Watchdog) -> list[Any]:
    """Gather every rank's result, or raise for the worker that failed first.

    A dead worker's peers fail too, often sooner than its death is noticed (their collectives
    see the connection drop). So after the first failure the parent listens a moment longer and
    blames a worker that died without reporting before one that raised: the root cause, not its
    echo. A worker the watchdog finds stalled is blamed before both.
    """
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: list[tuple[int, bool, str, str]] = []  # (rank, died, message, traceback)
    open_ = {r: rank for rank, r in enumerate(readers)}
    alive = {p.sentinel: rank for rank, p in enumerate(procs)}
    poll = min(1.0, watchdog.limit / 4)
    deadline = None
    while len(results) < world_size:
        wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        ready = mp.connection.wait([*open_, *alive], wait)
        for r in [r for r in ready if r in open_]:
            _read(r, open_.pop(r), results, failures)
        for sentinel in [s for s in ready if s in alive]:
            rank = alive.pop(sentinel)
            procs[rank].join()
            reader = readers[rank]
            if reader in open_:  # it may have reported just before exiting
                _read(reader, open_.pop(reader), results, failures)
            if rank not in results and not any(f[0] == rank for f in failures):
                failures.append((rank, True, _describe_exit(procs[rank].exitcode), ""))
        stall = watchdog.stalled(set(results) | {f[0] for f in failures})
        if stall is not None:
            raise WorkerError(stall.rank, stall.message(watchdog.limit))
        if failures and deadline is None:
            deadline = time.monotonic() + min(grace, 1.0)
        if failures and (not alive or time.monotonic() >= deadline):
            break
    if failures:
        stopped = watchdog.stopped(set(results) | {f[0] for f in failures})
        if stopped is not None:  # its peers timed out waiting on it: the cause, not the echo
            echo = ", ".join(f"rank {r} {m.split(':')[0]}" for r, _, m, _ in failures)
            raise WorkerError(stopped.rank, f"{stopped.message(watchdog.limit)}; then {echo}")
        rank, _, message, tb = min(failures, key=lambda f: not f[1])  # the dead first, stable
        others = [f"rank {r} {m.split(':')[0]}" for r, _, m, _ in failures if r != rank]
        if others:
            message += "; then " + ", ".join(others)
        raise WorkerError(rank, message, tb)
    return [results[r] for r in range(world_size)]


def _read(reader, rank: int, results: dict[int, Any], failures: list) -> None:
    """Read rank's one report: its result or its failure (nothing if it died first)."""
    try:
        status, payload = pickle.loads(reader.recv_bytes())
    except (EOFError, OSError):
        return
    if status == "err":
        failures.append((rank, False, payload[0], payload[1]))
    else:
        results[rank] = payload


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"died (killed by {name}) without returning a result"
    return (
        f"exited with code {code} without returning a result (its own output above says why; "
        "a script that calls plait.launch needs an `if __name__ == '__main__':` guard, as "
        "workers import the main module)"
    )


def _stop(procs, grace: float) -> None:
    """Terminate every worker still running; kill those that ignore it; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _die_with_launcher(alive) -> None:
    """Kill this worker as soon as its launcher is gone (however it ended): a thread waits on
    the read end of a pipe whose only write end the launcher holds; the kernel closes that end
    when the launcher dies, and the read returns."""

    def watch() -> None:
        try:
            alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="plait-launcher-watch", daemon=True).start()


def _worker(
    fn, args, rank, world_size, backend, host, port, timeout, threads, out, alive, slots
) -> None:
    _die_with_launcher(alive)
    heartbeat.attach(slots, rank)
    keep_freed_memory()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore(
            host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(*args)
        report = pickle.dumps(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        message = f"raised {type(exc).__name__}: {exc}"
        out.send_bytes(pickle.dumps(("err", (message, traceback.format_exc()))))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    heartbeat.beat("finished", watched=False)
    out.send_bytes(report)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already delivered
        pass


def _join_torchrun(fn, args, backend, timeout) -> list[Any]:
    """Under torchrun: run on this rank, then share results so every rank returns the list."""
    created = not dist.is_initialized()
    if created:
        world_size = int(os.environ["WORLD_SIZE"])
        backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    result = fn(*args)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if created:
        dist.destroy_process_group()
    return gathered
