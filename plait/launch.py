"""Run a function on N local workers with torch.distributed initialised.

``launch(fn, world_size, *args)`` starts ``world_size`` processes, initialises a process group in
each (gloo on CPU, NCCL when every worker has its own GPU), calls ``fn(*args)`` and returns the
per-rank return values as a list. Inside a job that torchrun started it joins that job instead, so
the same code runs on one machine or many.

Failure is the part worth reading: workers report back through a queue, and the parent watches
that queue and every worker's process sentinel at once. The first worker that raises or dies
(SIGKILL included) brings the whole job down: the others are terminated (then killed after a short
grace period), reaped, and :class:`WorkerError` is raised naming the rank and carrying its
traceback. A collective that never completes fails after ``timeout`` seconds, the process-group
timeout, instead of hanging.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from plait.alloc import keep_freed_memory

__all__ = ["launch", "WorkerError", "default_backend"]

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
    queue = ctx.SimpleQueue()
    procs = []
    for rank in range(world_size):
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
                queue,
            ),
            name=f"plait-rank{rank}",
        )
        p.start()
        procs.append(p)
    try:
        return _collect(procs, queue, world_size, grace)
    finally:
        _stop(procs, grace)
        queue.close()
        del store


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


def _collect(procs, queue, world_size: int, grace: float) -> list[Any]:
    """Gather every rank's result, or raise for the worker that failed first.

    A dead worker's peers fail too, often sooner than its death is noticed (their collectives
    see the connection drop). So after the first failure the parent listens a moment longer and
    blames a worker that died without reporting before one that raised: the root cause, not its
    echo.
    """
    results: dict[int, Any] = {}
    failures: list[tuple[int, bool, str, str]] = []  # (rank, died, message, traceback)
    reader = queue._reader  # the pipe end, waitable together with the sentinels
    alive = {p.sentinel: rank for rank, p in enumerate(procs)}
    deadline = None
    while len(results) < world_size:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = mp.connection.wait([reader, *alive], timeout)
        if reader in ready:
            _drain(queue, results, failures)
        for sentinel in [s for s in ready if s in alive]:
            rank = alive.pop(sentinel)
            procs[rank].join()
            _drain(queue, results, failures)  # it may have reported just before exiting
            if rank not in results and not any(f[0] == rank for f in failures):
                failures.append((rank, True, _describe_exit(procs[rank].exitcode), ""))
        if failures and deadline is None:
            deadline = time.monotonic() + min(grace, 1.0)
        if failures and (not ready or not alive or time.monotonic() >= deadline):
            break
    if failures:
        rank, _, message, tb = min(failures, key=lambda f: not f[1])  # the dead first, stable
        others = [f"rank {r} {m.split(':')[0]}" for r, _, m, _ in failures if r != rank]
        if others:
            message += "; then " + ", ".join(others)
        raise WorkerError(rank, message, tb)
    return [results[r] for r in range(world_size)]


def _drain(queue, results: dict[int, Any], failures: list) -> None:
    """Read whatever is queued: results, and failures in the order they came."""
    while not queue.empty():
        status, rank, payload = queue.get()
        if status == "err":
            failures.append((rank, False, payload[0], payload[1]))
        else:
            results[rank] = pickle.loads(payload)


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


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker if the launching process dies (no orphans)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker(fn, args, rank, world_size, backend, host, port, timeout, threads, queue) -> None:
    _die_with_parent()
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
        payload = pickle.dumps(result)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        message = f"raised {type(exc).__name__}: {exc}"
        queue.put(("err", rank, (message, traceback.format_exc())))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    queue.put(("ok", rank, payload))
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
