"""Shared-memory point-to-point between the pipeline ranks of one host (CPU).

gloo moves every message through a loopback TCP socket and a device thread on each side: the
receiving process's thread wakes to read the socket, then wakes the rank waiting on the receive.
Between two processes on one host a message can instead be copied into a ring buffer both map,
and the waiting rank sees it as soon as it is written. Measured on the 2-core development
machine (``benchmarks/p2p_vs_gloo.py``), a round trip there and back: 16 KB 29 us against gloo's
137 us, 256 KB 111 against 278 us, 4 MB 1.4 against 3.7 ms.

:class:`ShmTransport` offers the two calls the pipeline runtime makes of a process group,
``send([tensor], dst, tag)`` and ``recv([tensor], src, tag)``, each returning a work with
``wait()`` and ``is_completed()``. Messages between a pair under one tag are matched in the order
they are posted, as gloo and NCCL match them.

- **Rings.** Every ordered pair of ranks (and tag) the schedule uses gets one single-producer,
  single-consumer byte ring: a file in ``/dev/shm`` (mode 0600, a random name) that both map,
  its pages faulted in at set-up (a page first touched inside a step cost a fault per 4 KB
  sent: 0.1 ms per 16 KB message).
  The producer copies a message's bytes in and then publishes the new tail; the consumer copies
  them out into the posted receive buffer and then publishes the new head. A message larger than
  the free space streams through in parts.
- **Progress** needs no thread: sends push what fits when posted and whenever the runtime checks
  them, and every wait (of a receive or a send) pushes this rank's pending sends and pulls into
  its posted receives, so two ranks waiting on each other always move. A send that does not fit
  keeps pushing while the receiver takes its bytes (a receiver waiting for it takes them at
  copy speed), and leaves the rest for later once nothing has moved for :data:`SPIN_S`, so a
  message larger than the ring streams through without a thread and a send never blocks.
- **Waiting** spins for up to :data:`SPIN_S` (a waiting rank has nothing else to run), then polls
  with short sleeps. Each turn of the spin yields the CPU (``sched_yield``) to any thread the OS
  queued behind it: a peer still finishing a gloo collective (the barrier or all-reduce before a
  step) otherwise waited out the whole spin: measured up to 2 ms late into a step on 2 cores. Where the host's processes outnumber its cores (``LOCAL_WORLD_SIZE`` times
  the threads per process above the usable CPUs) it sleeps from the start, so a waiting rank
  never takes a core from one computing.
- **Failure.** A wait checks every :data:`CHECK_S` whether the peer process is still alive (its
  pid and start time, read from ``/proc``) and how long it has waited: a dead peer or the
  process group's timeout raises an error naming the peer rank and the message awaited.

Memory order: the producer copies the bytes (``memcpy``, which fences its non-temporal stores)
and then stores the tail (one aligned 8-byte store); the consumer loads the tail and then the
bytes, and stores the head only after loading them. x86-64 keeps stores in order with stores,
loads with loads, and a store after the loads before it, so the consumer never sees a tail
ahead of its bytes and the producer never overwrites bytes not yet read. Other architectures would need explicit barriers, which Python cannot
issue, so the transport is offered only on x86-64 Linux.

Set-up (:func:`connect`, collective over the pipeline group): each rank creates its outgoing
rings, the ranks exchange names, host identity and pids, each maps its incoming rings, and the
creators unlink the files once every peer has mapped them, so nothing is left behind whichever
way the job ends. If any rank cannot (another host, no ``/dev/shm``, another architecture) every
rank keeps the process group, and :func:`connect` says why.
"""

from __future__ import annotations

import ctypes
import datetime
import mmap
import os
import platform
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["ShmTransport", "connect", "pairs_of"]

RING_BYTES = 8 << 20  # data ring per ordered pair (larger messages stream through it)
SMALL_RING_BYTES = 4096  # the loss ring (tag 1): one float64 per step
SPIN_S = 2e-3  # spin this long before sleeping between polls
CHECK_S = 0.5  # how often a long wait checks the peer and the timeout
_SLEEP_MIN_S, _SLEEP_MAX_S = 50e-6, 250e-6
_HEADER = 128  # tail at byte 0 and head at byte 64: each counter on its own cache line
_DIR = "/dev/shm"


class _Ring:
    """One single-producer single-consumer byte ring in a shared file."""

    def __init__(self, path: str, capacity: int, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # reserve the memory now: a /dev/shm too small for the ring (Docker's default is
                # 64 MB) fails here with ENOSPC, and the ranks keep the process group, where a
                # sparse file would raise SIGBUS at a write in the middle of training
                os.posix_fallocate(fd, 0, _HEADER + capacity)
            size = os.fstat(fd).st_size
            # fault every page in now: a ring is written all round, and a page first touched in
            # a step costs a fault (and the writer's side a zeroed page) inside a send
            populate = getattr(mmap, "MAP_POPULATE", 0)
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
        except BaseException:
            if create:  # a ring that could not be made leaves no file behind
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.path = path
        self.capacity = size - _HEADER
        self._tail = ctypes.c_int64.from_buffer(self._mm, 0)
        self._head = ctypes.c_int64.from_buffer(self._mm, 64)
        self._data = memoryview(self._mm)[_HEADER:]

    def push(self, src: memoryview, done: int) -> int:
        """Copy in what fits of ``src[done:]``; returns the bytes copied."""
        tail = self._tail.value
        n = min(len(src) - done, self.capacity - (tail - self._head.value))
        if n <= 0:
            return 0
        off = tail % self.capacity
        k = min(n, self.capacity - off)
        self._data[off : off + k] = src[done : done + k]
        if n > k:
            self._data[: n - k] = src[done + k : done + n]
        self._tail.value = tail + n  # publish after the bytes
        return n

    def pull(self, dst: memoryview, done: int) -> int:
        """Copy out what has arrived of ``dst[done:]``; returns the bytes copied."""
        head = self._head.value
        n = min(len(dst) - done, self._tail.value - head)
        if n <= 0:
            return 0
        off = head % self.capacity
        k = min(n, self.capacity - off)
        dst[done : done + k] = self._data[off : off + k]
        if n > k:
            dst[done + k : done + n] = self._data[: n - k]
        self._head.value = head + n  # free the space after the bytes are out
        return n

    def close(self) -> None:
        del self._tail, self._head
        self._data.release()
        self._mm.close()


class _Work:
    """A send or receive through a ring: ``wait()`` and ``is_completed()`` as a process group's."""

    __slots__ = ("_transport", "view", "done", "tensor", "peer", "sending")

    def __init__(self, transport: ShmTransport, tensor: torch.Tensor, peer: int, sending: bool):
        self._transport = transport
        self.tensor = tensor  # keeps the bytes alive until they have moved
        self.peer, self.sending = peer, sending
        n = _nbytes(tensor)
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"shared-memory messages are contiguous CPU tensors, got {self.what} "
                f"({tensor.device.type}, contiguous={tensor.is_contiguous()})"
            )
        raw = (ctypes.c_char * n).from_address(tensor.data_ptr()) if n else b""
        self.view = memoryview(raw).cast("B")
        self.done = 0

    @property
    def what(self) -> str:
        """The message, in words (for errors only: not built on the hot path)."""
        n = _nbytes(self.tensor)
        if self.sending:
            return f"a send of {n} bytes to rank {self.peer}"
        return f"a message of {n} bytes from rank {self.peer}"

    def is_completed(self) -> bool:
        if self.done < len(self.view):
            self._transport.progress()
        return self.done >= len(self.view)

    def wait(self) -> bool:
        if self.done < len(self.view):
            self._transport.wait_until(lambda: self.done >= len(self.view), lambda: self.what)
        return True


class _Channel:
    """One ring and the works queued on it, oldest first."""

    __slots__ = ("ring", "queue", "push")

    def __init__(self, ring: _Ring, push: bool):
        self.ring, self.queue, self.push = ring, deque(), push

    def move(self) -> bool:
        """Move bytes for the queued works in order; True while some are left."""
        q, step = self.queue, (self.ring.push if self.push else self.ring.pull)
        while q:
            w = q[0]
            w.done += step(w.view, w.done)
            if w.done < len(w.view):
                return True
            q.popleft()
        return False


class ShmTransport:
    """Point-to-point through shared-memory rings, for the ranks :func:`connect` mapped.

    Args:
        out_rings: ``{(dst global rank, tag): ring}`` this rank writes.
        in_rings: ``{(src global rank, tag): ring}`` this rank reads.
        peers: ``{global rank: (pid, start time)}`` to check while waiting (a peer whose process
            this rank cannot see is left out).
        timeout_s: how long a wait may last before it fails.
        oversubscribed: sleep between polls from the start instead of spinning.
    """

    def __init__(self, out_rings, in_rings, peers, timeout_s: float, oversubscribed: bool):
        self._out = {k: _Channel(r, True) for k, r in out_rings.items()}
        self._in = {k: _Channel(r, False) for k, r in in_rings.items()}
        self._busy: list[_Channel] = []  # channels with queued works
        self._peers = dict(peers)
        self._timeout_s = timeout_s
        self._spin_s = 0.0 if oversubscribed else SPIN_S

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        """Queue ``tensors[0]`` for ``dst``; it moves while the receiver takes it (see above)."""
        (t,) = tensors
        ch = self._channel(self._out, dst, tag, "to")
        work = self._queue(ch, _Work(self, t, dst, sending=True))
        if work.done < len(work.view) and ch.queue[0] is work:
            clock = time.perf_counter
            moved, last = work.done, clock()
            while work.done < len(work.view):
                self.progress()
                now = clock()
                if work.done > moved:
                    moved, last = work.done, now
                elif now - last > self._spin_s:
                    break  # the receiver is busy: the rest moves at later checks and waits
        return work

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        """Post ``tensors[0]`` for the next message from ``src`` under ``tag``."""
        (t,) = tensors
        ch = self._channel(self._in, src, tag, "from")
        return self._queue(ch, _Work(self, t, src, sending=False))

    def _channel(self, table: dict, peer: int, tag: int, direction: str) -> _Channel:
        ch = table.get((peer, tag))
        if ch is None:
            raise RuntimeError(
                f"no shared-memory ring {direction} rank {peer} under tag {tag}; this rank has "
                f"rings for {sorted(table)} (the schedule's pairs)"
            )
        return ch

    def _queue(self, ch: _Channel, work: _Work) -> _Work:
        ch.queue.append(work)
        if len(ch.queue) == 1 and not ch.move():
            return work
        if ch not in self._busy:
            self._busy.append(ch)
        return work

    def progress(self) -> None:
        """Move every queued send and receive as far as it goes now."""
        if self._busy:
            self._busy = [ch for ch in self._busy if ch.move()]

    def wait_until(self, done: Callable[[], bool], what: Callable[[], str]) -> None:
        """Progress until ``done()``; fails when a peer dies or the timeout passes (``what()``
        says what was awaited)."""
        clock = time.perf_counter
        start = clock()
        spin_until, check_at, nap = start + self._spin_s, start + CHECK_S, _SLEEP_MIN_S
        while True:
            self.progress()
            if done():
                return
            now = clock()
            if now < spin_until:
                os.sched_yield()  # a thread queued on this CPU runs now, not after the spin
                continue
            time.sleep(nap)
            nap = min(2 * nap, _SLEEP_MAX_S)
            if now >= check_at:
                check_at = now + CHECK_S
                self._check(what(), now - start)

    def _check(self, what: str, waited_s: float) -> None:
        for rank, (pid, start) in self._peers.items():
            if not _alive(pid, start):
                raise RuntimeError(
                    f"pipeline peer rank {rank} (pid {pid}) exited while this rank waited for "
                    f"{what}"
                )
        if waited_s > self._timeout_s:
            raise RuntimeError(
                f"waited {waited_s:.0f} s (the process group's timeout) for {what}; the peer "
                f"is alive but has not sent or received it"
            )

    def close(self) -> None:
        """Unmap the rings (their files were unlinked at set-up)."""
        for ch in [*self._out.values(), *self._in.values()]:
            ch.ring.close()
        self._out, self._in, self._busy = {}, {}, []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, None where it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def _alive(pid: int, start: int) -> bool:
    st = _proc_start(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _unsupported() -> str | None:
    """Why this process cannot use the transport, or None."""
    if sys.platform != "linux":
        return f"the platform is {sys.platform}, not Linux"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the architecture is {platform.machine()}, not x86-64 (memory order)"
    if not (os.path.isdir(_DIR) and os.access(_DIR, os.W_OK)):
        return f"{_DIR} is missing or not writable"
    return None


def pairs_of(schedule) -> set[tuple[int, int, int]]:
    """``(src pp rank, dst pp rank, tag)`` of every message a schedule's steps send.

    Activations and gradients (tag 0) follow the SEND actions; a training step's loss (tag 1)
    goes from the last stage's rank to every other.
    """
    from plait.pipeline.schedule import Kind

    out = set()
    stage_to_rank = schedule.stage_to_rank
    for r, acts in enumerate(schedule.actions):
        for a in acts:
            if a.kind is Kind.SEND_ACT:
                out.add((r, stage_to_rank[a.stage + 1], 0))
            elif a.kind is Kind.SEND_GRAD:
                out.add((r, stage_to_rank[a.stage - 1], 0))
    if not schedule.is_forward_only:
        last = stage_to_rank[-1]
        out |= {(last, r, 1) for r in range(schedule.num_ranks) if r != last}
    return out


def connect(
    pairs: Iterable[tuple[int, int, int]],
    pp_rank: int,
    global_rank: Callable[[int], int],
    group=None,
    ring_bytes: int | None = None,
    blocked: str | None = None,
) -> tuple[ShmTransport | None, str]:
    """Map the rings for ``pairs`` (pp ranks) on every pipeline rank; collective over ``group``.

    ``ring_bytes`` is each data ring's size (default :data:`RING_BYTES`). ``blocked`` is this
    rank's own reason not to (its stages are not on the CPU, say). Returns
    ``(transport, "")``, or ``(None, why)`` on every rank when any rank cannot use shared memory
    (the caller keeps the process group).
    """
    pairs = sorted(set(pairs))
    ring_bytes = ring_bytes or RING_BYTES
    why = blocked or _unsupported()
    token = secrets.token_hex(8)
    made: dict[tuple[int, int], _Ring] = {}
    if why is None:
        try:
            for src, dst, tag in pairs:
                if src == pp_rank:
                    path = os.path.join(_DIR, f"plait-p2p-{token}-{src}-{dst}-{tag}")
                    size = ring_bytes if tag == 0 else SMALL_RING_BYTES
                    made[(dst, tag)] = _Ring(path, size, create=True)
        except OSError as e:
            why = f"creating a ring in {_DIR} failed: {e}"
    start = _proc_start(os.getpid())
    mine = {
        "pp_rank": pp_rank,
        "why": why,
        "host": _host_id(),
        "pid": os.getpid(),
        "start": None if start is None else start[1],
        "paths": {k: r.path for k, r in made.items()},
    }
    infos = sorted(_all_gather(mine, group), key=lambda info: info["pp_rank"])
    why = _first_reason(infos) or _hosts_differ(infos)
    got: dict[tuple[int, int], _Ring] = {}
    if why is None:
        try:
            for src, dst, tag in pairs:
                if dst == pp_rank:
                    got[(src, tag)] = _Ring(infos[src]["paths"][(dst, tag)], 0, create=False)
        except OSError as e:
            why = f"mapping a peer's ring failed: {e}"
        why = _first_reason(_all_gather({"why": why}, group))
    for r in made.values():  # every peer holds its mapping now (or nobody will use it)
        try:
            os.unlink(r.path)
        except OSError:
            pass
    if why is not None:
        for r in [*made.values(), *got.values()]:
            r.close()
        return None, why
    peers = {}
    for r, info in enumerate(infos):
        if r != pp_rank and info["start"] is not None and _alive(info["pid"], info["start"]):
            peers[global_rank(r)] = (info["pid"], info["start"])
    transport = ShmTransport(
        {(global_rank(dst), tag): ring for (dst, tag), ring in made.items()},
        {(global_rank(src), tag): ring for (src, tag), ring in got.items()},
        peers,
        _timeout_s(),
        _oversubscribed(len(infos)),
    )
    return transport, ""


def _all_gather(obj, group) -> list:
    size = dist.get_world_size(group)
    out: list = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def _first_reason(infos: list) -> str | None:
    for r, info in enumerate(infos):
        if info["why"] is not None:
            return f"pipeline rank {r}: {info['why']}"
    return None


def _hosts_differ(infos: list) -> str | None:
    hosts = {info["host"] for info in infos}
    if len(hosts) > 1:
        return f"the pipeline ranks are on {len(hosts)} hosts ({', '.join(sorted(hosts))})"
    return None


def _timeout_s() -> float:
    """The default process group's timeout (30 minutes where it cannot be read)."""
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except Exception:  # private API: any change falls back to the documented default
        return datetime.timedelta(minutes=30).total_seconds()


def _oversubscribed(local_ranks: int) -> bool:
    """More compute threads on this host than usable CPUs: ``LOCAL_WORLD_SIZE`` processes (as
    plait's launcher and torchrun set it; at least the ``local_ranks`` pipeline ranks here)."""
    procs = max(int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0), local_ranks)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return procs * torch.get_num_threads() > cpus
