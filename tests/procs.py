"""Process helpers for fault tests: a process's children, waiting on another process's progress."""

import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something truthy (another process's progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling an external process's progress, not synchronising our own
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def train_cmd(
    corpus, metrics, ck, *extra, steps=16, batch=8, seq=32, every=4, timeout=None
) -> list[str]:
    """``plait train`` of ``tiny`` on ``corpus`` as a command line, writing metrics and
    checkpoints (every ``every`` steps); ``extra`` flags go last."""
    import sys

    cmd = [sys.executable, "-m", "plait.cli", "train", "--model", "tiny", "--steps", str(steps)]
    cmd += ["--batch-size", str(batch), "--seq-len", str(seq), "--data", corpus]
    cmd += ["--metrics-out", str(metrics), "--checkpoint-dir", str(ck)]
    cmd += ["--checkpoint-every", str(every), "--no-progress"]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    return cmd + list(extra)


def steps_done(metrics: Path) -> int:
    """Steps a ``--metrics-out`` file has recorded so far."""
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0
