"""Module-level functions for plait.tasks tests (worker processes import them by name)."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from pathlib import Path


def square_pid(x):
    return x * x, os.getpid()


def _record(exec_dir: str, x) -> None:
    """One file per execution of item ``x``: counting them counts executions."""
    Path(exec_dir, f"{x}-{os.getpid()}-{uuid.uuid4().hex}").touch()


def executions(exec_dir) -> dict:
    counts: dict[int, int] = {}
    for f in Path(exec_dir).iterdir():
        x = int(f.name.split("-")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


def executed_pids(exec_dir) -> set[int]:
    return {int(f.name.split("-")[1]) for f in Path(exec_dir).iterdir()}


def recorded_square(exec_dir: str, x):
    _record(exec_dir, x)
    return x * x


def gated(fifo: str, n: int, x):
    """Item 0 holds its worker until item n-1 starts (a FIFO rendezvous; no sleeps, no clocks).

    Opening a FIFO blocks until the other end is opened too, so item 0 cannot finish before
    item n-1 has started, whichever worker each runs on.
    """
    if x == 0:
        with open(fifo, "rb") as f:
            f.read()
    elif x == n - 1:
        with open(fifo, "wb") as f:
            f.write(b"go")
    return x, os.getpid()


def kill_once(marker: str, exec_dir: str, victim: int, x):
    """SIGKILL this worker on item ``victim`` the first time it is seen (the marker says so)."""
    _record(exec_dir, x)
    if x == victim and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x, os.getpid()


def kill_always(exec_dir: str, victim: int, x):
    _record(exec_dir, x)
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def raise_on(victim: int, x):
    if x == victim:
        raise ValueError(f"bad item {x}")
    return x


def block_forever(fifo: str, x):
    with open(fifo, "rb") as f:  # nobody ever writes: only the timeout ends this
        f.read()
    return x


_SETUPS = 0


def setup_counter(setup_dir: str):
    """A per-worker setup that leaves one file per call."""
    Path(setup_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    return {"offset": 100, "pid": os.getpid()}


def use_state(state, x):
    return x + state["offset"], state["pid"]


def failing_setup():
    raise RuntimeError("cannot load the model")


def kill_parent_at(parent_pid: int, exec_dir: str, victim: int, x):
    """Simulate an interrupted job: SIGKILL the process running tasks.map on item ``victim``."""
    _record(exec_dir, x)
    if x == victim:
        os.kill(parent_pid, signal.SIGKILL)
    return x * x


def double_with_state(state, x):
    return 2 * x + state["offset"], state["pid"]


def raise_with_state(state, x):
    if x == 2:
        raise ValueError(f"bad item {x}")
    return x, state["pid"]


def announce_and_block(exec_dir: str, fifo: str, x):
    """Record that item ``x`` runs in this process (the test waits for that file), then block."""
    _record(exec_dir, x)
    with open(fifo, "rb") as f:  # nobody writes: the item runs until its worker is killed
        f.read()
    return x


@dataclasses.dataclass
class Point:
    """A dataclass work item (fingerprinted by its fields)."""

    x: int
    tags: frozenset


class Opaque:
    """An item type plait does not know how to fingerprint (it must be given a key=)."""

    def __init__(self, n: int):
        self.n = n


def opaque_square(o: Opaque):
    return o.n * o.n
