"""Shared-memory point-to-point (plait.pipeline.shm): rings, ordering, streaming, failures.

The multi-process equivalence tests (test_pipeline.py, test_train_mesh.py, ...) run every
schedule over this transport, since it is the default between CPU ranks on one host; the tests
here take its parts apart in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.models.transformer import ModelConfig, Transformer
from plait.pipeline import PipelineRuntime, build_schedule, partition, shm

pytestmark = pytest.mark.skipif(shm._unsupported() is not None, reason="needs x86-64 Linux")


def _pair(tmp: str, capacity: int, name: str = "ring") -> tuple[shm._Ring, shm._Ring]:
    path = os.path.join(tmp, name)
    writer = shm._Ring(path, capacity, create=True)
    reader = shm._Ring(path, 0, create=False)
    os.unlink(path)  # the mappings outlive the name, as after connect()
    return writer, reader


def _transports(tmp: str, capacity: int) -> tuple[shm.ShmTransport, shm.ShmTransport]:
    """Rank 0 and rank 1 in one process: rank 0's out ring is rank 1's in ring and back."""
    a_out, b_in = _pair(tmp, capacity, "a")
    b_out, a_in = _pair(tmp, capacity, "b")
    a = shm.ShmTransport({(1, 0): a_out}, {(1, 0): a_in}, {}, 60.0, True)
    b = shm.ShmTransport({(0, 0): b_out}, {(0, 0): b_in}, {}, 60.0, True)
    return a, b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 700), min_size=1, max_size=30), st.integers(1, 5))
def test_ring_streams_any_sizes_in_order_through_wraparound(tmp_path_factory, sizes, chunk):
    writer, reader = _pair(str(tmp_path_factory.mktemp("r")), 1000)
    data = [bytes((i * 7 + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]
    stream = b"".join(data)
    got = bytearray(len(stream))
    view, sent, received = memoryview(got), 0, 0
    src = memoryview(stream)
    while received < len(stream):
        # the writer pushes at most `chunk` times before the reader pulls: the ring fills
        for _ in range(chunk):
            sent += writer.push(src, sent)
        assert sent - received <= writer.capacity
        received += reader.pull(view, received)
    assert bytes(got) == stream
    assert writer.push(memoryview(b"x" * 2000), 0) == 1000  # fills, never overwrites
    assert writer.push(memoryview(b"x"), 0) == 0
    assert reader.pull(memoryview(bytearray(5)), 0) == 5
    writer.close(), reader.close()


def test_transport_matches_messages_in_order_and_streams_when_the_ring_is_full(tmp_path):
    a, b = _transports(str(tmp_path), 1 << 13)
    msgs = [
        torch.arange(n, dtype=torch.float64) * (k + 1)
        for k, n in enumerate([300, 1, 0, 250, 64, 512, 3])
    ]
    sends = [a.send([t], 1, 0) for t in msgs]  # 9 KB into an 8 KB ring: some stay pending
    assert not all(w.is_completed() for w in sends)
    bufs = [torch.empty_like(t) for t in msgs]
    recvs = [b.recv([t], 0, 0) for t in bufs]
    for _ in range(100):  # both sides progress, as their waits do
        if all(w.is_completed() for w in sends + recvs):
            break
        a.progress(), b.progress()
    assert all(w.is_completed() for w in sends + recvs)
    for t, u in zip(msgs, bufs):
        assert torch.equal(t, u)
    # bf16 and integer tensors travel as bytes
    for t in (torch.randn(33).bfloat16(), torch.tensor([7], dtype=torch.int64)):
        w = a.send([t], 1, 0)
        out = torch.empty_like(t)
        b.recv([out], 0, 0).wait()
        assert w.is_completed() and torch.equal(out, t)
    with pytest.raises(RuntimeError, match=r"no shared-memory ring to rank 5 under tag 0"):
        a.send([msgs[0]], 5, 0)
    a.close(), b.close()


def test_a_message_larger_than_the_ring_streams_through_it(tmp_path):
    a, b = _transports(str(tmp_path), 1024)
    big = torch.randn(1000, dtype=torch.float64)  # 8000 bytes through a 1 KB ring
    send = a.send([big], 1, 0)  # the receiver is not taking it: the rest waits, send returns
    assert 0 < send.done < len(send.view)
    out = torch.empty_like(big)
    recv = b.recv([out], 0, 0)
    for _ in range(100):  # each check moves what the other side made room for
        if all([send.is_completed(), recv.is_completed()]):
            break
    assert torch.equal(out, big)
    a.close(), b.close()


def test_a_wait_names_a_dead_peer_promptly_and_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "CHECK_S", 0.01)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = shm._proc_start(child.pid)[1]
    writer, reader = _pair(str(tmp_path), 1024)
    t = shm.ShmTransport({}, {(1, 0): reader}, {1: (child.pid, start)}, 60.0, False)
    child.kill()
    child.wait()
    t0 = time.monotonic()
    with pytest.raises(
        RuntimeError,
        match=rf"pipeline peer rank 1 \(pid {child.pid}\) exited "
        r"while this rank waited for a message of 8 bytes from rank 1",
    ):
        t.recv([torch.zeros(1, dtype=torch.float64)], 1, 0).wait()
    assert time.monotonic() - t0 < 5
    alive = shm.ShmTransport({}, {(1, 0): reader}, {}, 0.05, False)
    with pytest.raises(RuntimeError, match=r"waited 0 s \(the process group's timeout\)"):
        alive.recv([torch.zeros(1)], 1, 0).wait()
    writer.close()


def test_pairs_follow_the_schedule():
    # 1f1b at p=3: activations go down, gradients up, the loss from the last rank to the others
    assert shm.pairs_of(build_schedule("1f1b", 3, 4)) == {
        (0, 1, 0),
        (1, 2, 0),
        (2, 1, 0),
        (1, 0, 0),
        (2, 0, 1),
        (2, 1, 1),
    }
    # interleaved wraps from the last rank back to the first; forward-only sends no loss
    fwd = shm.pairs_of(build_schedule("interleaved-1f1b", 2, 4, 2).forward_only())
    assert fwd == {(0, 1, 0), (1, 0, 0)}


def test_transport_must_name_a_choice():
    stages = partition(
        Transformer(
            ModelConfig(vocab_size=16, n_layers=2, hidden=8, n_heads=2, ffn=16, max_seq_len=8),
            seed=0,
        ),
        1,
    )
    with pytest.raises(ValueError, match=r"transport='tcp' is not valid; use one of"):
        PipelineRuntime(
            {0: stages[0]}, build_schedule("1f1b", 1, 2), None, Transformer.loss, transport="tcp"
        )
    rt = PipelineRuntime({0: stages[0]}, build_schedule("1f1b", 1, 2), None, Transformer.loss)
    assert rt.transport == "process-group"  # one rank sends nothing
    rt.close()
    with pytest.raises(RuntimeError, match="was closed"):
        rt.train_step(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.slow
def test_every_rank_agrees_on_the_transport_and_nothing_is_left_in_dev_shm():
    import pp_workers as W

    from plait import launch

    both = launch(W.shm_connect, 2, None, threads_per_worker=1, timeout=60)
    for r, res in enumerate(both):
        assert res["connected"] and res["why"] == ""
        assert torch.equal(res["got"], torch.arange(1000, dtype=torch.float64) * (2 - r))
    # one rank that cannot: both keep the process group, and both say which rank and why
    refused = launch(W.shm_connect, 2, 1, threads_per_worker=1, timeout=60)
    assert [res["connected"] for res in refused] == [False, False]
    assert {res["why"] for res in refused} == {"pipeline rank 1: told not to"}
    # the files are unlinked once mapped (or given up), whichever way set-up ended
    assert all(res["left"] == [] for res in both + refused)


def test_a_full_dev_shm_keeps_the_process_group(monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    monkeypatch.setattr(shm, "_all_gather", lambda obj, group: [obj])  # a one-rank "group"
    transport, why = shm.connect({(0, 0, 0)}, 0, lambda r: r)
    assert transport is None
    assert why.startswith("pipeline rank 0: creating a ring in /dev/shm failed: [Errno 28]")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("plait-p2p-")]
