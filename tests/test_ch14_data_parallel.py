"""Chapter 14 batteries: correct rings and DDPs in several styles pass, planted mistakes are named.

Rings: isend/recv (the reference), blocking send/recv ordered by rank parity, batch_isend_irecv,
zero padding to a multiple of p, numpy buffers. Mistakes: no all-gather, an average, mixed
chunk indices, sizes that must divide by p (raising or dropping the remainder), an input changed
in place, a deadlock, a collective, an error on one rank only.
DDPs: the reference (buckets), one asynchronous all-reduce per parameter, pre-divided
gradients waited at the end of backward. Mistakes: a sum, no broadcast, no_sync ignored,
waiting inside each hook, blocking hooks, no wait, all-reduces after backward, torch's DDP,
no_sync never switched back. Last, the torchrun script of the chapter.
"""

from __future__ import annotations

import contextlib
import re
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from launch import torchrun
from torch import nn

import course_utils as cu
from course_utils.checks import ch14_data_parallel as ch14

SEEDS = (0, 1, 2)


def _check(exercise_id: str, fn, seed: int = 0) -> cu.Report:
    return cu.check(exercise_id, fn, seed=seed, strict=True)


def _rejects(exercise_id: str, fn, *patterns: str) -> str:
    with pytest.raises(cu.CheckFailure) as info:
        _check(exercise_id, fn)
    text = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, text), f"{pattern!r} not in: {text}"
    return text


# =====================================================================================
# Correct rings
# =====================================================================================
def ring_parity(tensor):
    """Blocking send/recv: even ranks send first, odd ranks receive first."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.detach().flatten().clone()
    chunks = list(flat.tensor_split(p))

    def exchange(send, recv):
        if r % 2 == 0:
            dist.send(send, (r + 1) % p)
            dist.recv(recv, (r - 1) % p)
        else:
            dist.recv(recv, (r - 1) % p)
            dist.send(send, (r + 1) % p)

    for s in range(p - 1):
        got = torch.empty_like(chunks[(r - s - 1) % p])
        exchange(chunks[(r - s) % p], got)
        chunks[(r - s - 1) % p].add_(got)
    for s in range(p - 1):
        exchange(chunks[(r + 1 - s) % p], chunks[(r - s) % p])
    return flat.view(tensor.shape)


def ring_batched(tensor):
    """batch_isend_irecv with P2POp pairs; the result built with torch.cat at the end."""
    p, r = dist.get_world_size(), dist.get_rank()
    chunks = [c.clone() for c in tensor.reshape(-1).tensor_split(p)]
    for phase in ("reduce-scatter", "all-gather"):
        for s in range(p - 1):
            if phase == "reduce-scatter":
                out_i, in_i = (r - s) % p, (r - s - 1) % p
            else:
                out_i, in_i = (r + 1 - s) % p, (r - s) % p
            incoming = torch.empty_like(chunks[in_i])
            ops = [
                dist.P2POp(dist.isend, chunks[out_i], (r + 1) % p),
                dist.P2POp(dist.irecv, incoming, (r - 1) % p),
            ]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            chunks[in_i] = chunks[in_i] + incoming if phase == "reduce-scatter" else incoming
    return torch.cat(chunks).reshape(tensor.shape)


def ring_padded(tensor):
    """Zero padding to a multiple of p, equal chunks, irecv then isend; the padding cut off."""
    p, r = dist.get_world_size(), dist.get_rank()
    n = tensor.numel()
    size = -(-n // p) if n else 0
    buf = torch.zeros(size * p, dtype=tensor.dtype)
    buf[:n] = tensor.reshape(-1)
    view = buf.view(p, size)  # (p, chunk)
    for s in range(2 * (p - 1)):
        if s < p - 1:
            out_i, in_i = (r - s) % p, (r - s - 1) % p
        else:
            out_i, in_i = (r + 1 - (s - p + 1)) % p, (r - (s - p + 1)) % p
        incoming = torch.empty(size, dtype=tensor.dtype)
        recv = dist.irecv(incoming, (r - 1) % p)
        send = dist.isend(view[out_i].clone(), (r + 1) % p)
        recv.wait()
        send.wait()
        view[in_i] = view[in_i] + incoming if s < p - 1 else incoming
    return buf[:n].reshape(tensor.shape)


def ring_numpy(tensor):
    """The arithmetic in numpy; only the messages are torch tensors."""
    p, r = dist.get_world_size(), dist.get_rank()
    parts = np.array_split(tensor.detach().numpy().reshape(-1).copy(), p)
    for s in range(2 * (p - 1)):
        gather = s >= p - 1
        k = s - (p - 1) if gather else s
        out_i = (r + 1 - k) % p if gather else (r - k) % p
        in_i = (r - k) % p if gather else (r - k - 1) % p
        incoming = torch.empty(len(parts[in_i]), dtype=tensor.dtype)
        req = dist.isend(torch.from_numpy(parts[out_i].copy()), (r + 1) % p)
        dist.recv(incoming, (r - 1) % p)
        req.wait()
        parts[in_i] = incoming.numpy() if gather else parts[in_i] + incoming.numpy()
    return torch.from_numpy(np.concatenate(parts)).reshape(tensor.shape).to(tensor.dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_ring_passes(seed):
    assert _check("ring_all_reduce", ch14.ref_ring_all_reduce, seed).passed


@pytest.mark.parametrize("fn", [ring_parity, ring_batched, ring_padded, ring_numpy])
def test_correct_rings_in_other_styles_pass(fn):
    assert _check("ring_all_reduce", fn).passed


def test_ring_is_listed_with_its_forbidden_collectives():
    (ex,) = [e for e in cu.exercises("14") if e.id == "ring_all_reduce"]
    assert "dist.all_reduce" in ex.forbidden and "dist.reduce_scatter_tensor" in ex.forbidden


# =====================================================================================
# Planted ring mistakes
# =====================================================================================
def _reduce_scatter(flat, p, r, send_index=None):
    chunks = list(flat.tensor_split(p))
    for s in range(p - 1):
        out_i = (r - s) % p if send_index is None else send_index(r, s)
        in_i = (r - s - 1) % p
        got = torch.empty_like(chunks[in_i])
        req = dist.isend(chunks[out_i].clone(), (r + 1) % p)
        dist.recv(got, (r - 1) % p)
        req.wait()
        chunks[in_i] += got
    return chunks


def _all_gather(chunks, p, r):
    for s in range(p - 1):
        req = dist.isend(chunks[(r + 1 - s) % p].clone(), (r + 1) % p)
        dist.recv(chunks[(r - s) % p], (r - 1) % p)
        req.wait()


def ring_no_all_gather(tensor):
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    _reduce_scatter(flat, p, r)
    return flat.reshape(tensor.shape)


def ring_average(tensor):
    return ch14.ref_ring_all_reduce(tensor) / dist.get_world_size()


def ring_mixed_chunks(tensor):
    """Reduce-scatter sends chunk r at every step instead of chunk r - s."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    chunks = _reduce_scatter(flat, p, r, send_index=lambda r, s: r)
    _all_gather(chunks, p, r)
    return flat.reshape(tensor.shape)


def ring_gathers_wrong_chunks(tensor):
    """All-gather forwards chunk r - s (not r + 1 - s): unfinished partial sums travel."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    chunks = _reduce_scatter(flat, p, r)
    for s in range(p - 1):
        req = dist.isend(chunks[(r - s) % p].clone(), (r + 1) % p)
        dist.recv(chunks[(r - s - 1) % p], (r - 1) % p)
        req.wait()
    return flat.reshape(tensor.shape)


def ring_view_raises(tensor):
    """view(p, -1): a RuntimeError when the size does not divide by p."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    rows = flat.view(p, -1)  # (p, N/p)
    chunks = list(rows.unbind(0))
    for s in range(p - 1):
        got = torch.empty_like(chunks[(r - s - 1) % p])
        req = dist.isend(chunks[(r - s) % p].clone(), (r + 1) % p)
        dist.recv(got, (r - 1) % p)
        req.wait()
        chunks[(r - s - 1) % p] += got
    _all_gather(chunks, p, r)
    return flat.reshape(tensor.shape)


def ring_truncates(tensor):
    """Chunks of N // p elements: the last N mod p elements are never sent."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    c = flat.numel() // p
    chunks = [flat[i * c : (i + 1) * c] for i in range(p)]
    for s in range(p - 1):
        got = torch.empty_like(chunks[(r - s - 1) % p])
        req = dist.isend(chunks[(r - s) % p].clone(), (r + 1) % p)
        dist.recv(got, (r - 1) % p)
        req.wait()
        chunks[(r - s - 1) % p] += got
    _all_gather(chunks, p, r)
    return flat.reshape(tensor.shape) if c * p == flat.numel() else flat[: c * p]


def ring_truncates_keeps_shape(tensor):
    """Chunks of N // p elements; the remainder keeps this rank's own values."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    c = flat.numel() // p
    chunks = [flat[i * c : (i + 1) * c] for i in range(p)]
    for s in range(p - 1):
        got = torch.empty_like(chunks[(r - s - 1) % p])
        req = dist.isend(chunks[(r - s) % p].clone(), (r + 1) % p)
        dist.recv(got, (r - 1) % p)
        req.wait()
        chunks[(r - s - 1) % p] += got
    _all_gather(chunks, p, r)
    return flat.reshape(tensor.shape)


def ring_in_place(tensor):
    """Works on tensor.view(-1): the sum lands in the caller's tensor."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.view(-1)
    chunks = _reduce_scatter(flat, p, r)
    _all_gather(chunks, p, r)
    return flat.view(tensor.shape).clone()


def ring_recv_first(tensor):
    """Every rank receives before it sends: nobody ever sends."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.reshape(-1).clone()
    chunks = list(flat.tensor_split(p))
    for s in range(p - 1):
        got = torch.empty_like(chunks[(r - s - 1) % p])
        dist.recv(got, (r - 1) % p)
        dist.send(chunks[(r - s) % p], (r + 1) % p)
        chunks[(r - s - 1) % p] += got
    _all_gather(chunks, p, r)
    return flat.reshape(tensor.shape)


def ring_builtin(tensor):
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def ring_raises_on_rank_1(tensor):
    if dist.get_rank() == 1:
        raise ValueError("rank 1 refuses")
    return ch14.ref_ring_all_reduce(tensor)


def test_ring_without_all_gather_is_named():
    _rejects("ring_all_reduce", ring_no_all_gather, r"skips the all-gather", r"rank 0 chunk 1")


def test_ring_that_averages_is_named():
    _rejects("ring_all_reduce", ring_average, r"averages instead of summing", r"p = 2")


def test_ring_with_mixed_chunk_indices_is_named():
    _rejects(
        "ring_all_reduce", ring_mixed_chunks, r"chunk indices are mixed up", r"holds data of chunk"
    )


def test_ring_that_gathers_the_wrong_chunks_is_named():
    _rejects("ring_all_reduce", ring_gathers_wrong_chunks, r"chunk indices are mixed up")


def test_ring_that_needs_divisible_sizes_and_raises_is_named():
    text = _rejects(
        "ring_all_reduce",
        ring_view_raises,
        r"only works when the size divides by p",
        r"numel 21 does not divide by p=2",
        r"on rank \d of 2",
    )
    assert "RuntimeError" in text


def test_ring_that_drops_the_remainder_is_named():
    _rejects(
        "ring_all_reduce", ring_truncates, r"only works when the size divides by p", r"dropped"
    )


def test_ring_that_leaves_the_remainder_unreduced_is_named():
    _rejects(
        "ring_all_reduce",
        ring_truncates_keeps_shape,
        r"only works when the size divides by p",
        r"last 1 element",
    )


def test_ring_that_changes_its_input_is_named():
    _rejects("ring_all_reduce", ring_in_place, r"changed its input `tensor` in place")


def test_ring_that_deadlocks_names_rank_and_call():
    start = time.perf_counter()
    _rejects(
        "ring_all_reduce",
        ring_recv_first,
        r"deadlocked",
        r"rank 0 is waiting in dist\.recv\(src=1\)",
    )
    # stopped by the world's timeout, not left to hang (generous: a slow machine must not fail)
    assert time.perf_counter() - start < 60


def test_ring_that_calls_all_reduce_is_refused():
    _rejects("ring_all_reduce", ring_builtin, r"dist\.all_reduce", r"may not")


def test_ring_raising_on_one_rank_names_that_rank():
    _rejects("ring_all_reduce", ring_raises_on_rank_1, r"rank 1", r"ValueError", r"rank 1 refuses")


@pytest.mark.forbidden_calls_allowed
def test_forbidden_calls_allowed_marker_lets_a_planted_collective_through():
    # the test suite's switch reaches the forked ranks: the builtin gives the right sum
    assert _check("ring_all_reduce", ring_builtin).passed


def test_pending_ring_is_pending_in_learn_mode():
    def ring_all_reduce(tensor):
        raise NotImplementedError("ring_all_reduce: not yet")

    assert cu.check("ring_all_reduce", ring_all_reduce, strict=False).status == "pending"


# =====================================================================================
# DDP: correct classes
# =====================================================================================
class DDPPerParameter(nn.Module):
    """No buckets: one asynchronous all-reduce of each .grad in place, divided in finish."""

    def __init__(self, module, bucket_cap_mb=25):
        super().__init__()
        self.module = module
        self.sync = True
        self.works = []
        with torch.no_grad():
            for q in module.parameters():
                dist.broadcast(q, 0)
        for q in module.parameters():
            q.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, q):
        if self.sync:
            self.works.append((dist.all_reduce(q.grad, async_op=True), q))

    def forward(self, x):
        return self.module(x)

    def finish_gradient_synchronization(self):
        for work, q in self.works:
            work.wait()
            q.grad /= dist.get_world_size()
        self.works = []

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


class DDPWaitAtEndOfBackward(ch14.RefDDP):
    """Pre-divided buckets waited by a callback queued on the autograd engine (end of backward)."""

    def _grad_ready(self, param):
        if not self.require_sync:
            return
        if not self.pending and all(r == 0 for r in self.ready):
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        i = self.bucket_of[id(param)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]]) / self.world_size
            self.pending.append((dist.all_reduce(flat, async_op=True), flat, self.buckets[i]))

    def _finish(self):
        for work, flat, bucket in self.pending:
            work.wait()
            for q, avg in zip(bucket, flat.split([q.numel() for q in bucket]), strict=True):
                q.grad.copy_(avg.view_as(q))
        self.pending.clear()
        self.ready = [0] * len(self.buckets)

    def finish_gradient_synchronization(self):
        pass


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_ddp_passes(seed):
    assert _check("ddp", ch14.RefDDP, seed).passed


@pytest.mark.parametrize("cls", [DDPPerParameter, DDPWaitAtEndOfBackward])
def test_correct_ddps_in_other_styles_pass(cls):
    assert _check("ddp", cls).passed


# =====================================================================================
# DDP: planted mistakes
# =====================================================================================
class DDPSums(ch14.RefDDP):
    def finish_gradient_synchronization(self):
        for work, flat, bucket in self.pending:
            work.wait()
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket]), strict=True):
                q.grad.copy_(g.view_as(q))
        self.pending.clear()
        self.ready = [0] * len(self.buckets)


class DDPNoBroadcast(ch14.RefDDP):
    def __init__(self, module, bucket_cap_mb=25.0):
        real = dist.broadcast
        dist.broadcast = lambda *a, **k: None
        try:
            super().__init__(module, bucket_cap_mb)
        finally:
            dist.broadcast = real


class DDPIgnoresNoSync(ch14.RefDDP):
    """no_sync() does nothing, and the hooks all-reduce .grad itself in place (so results agree)."""

    def _grad_ready(self, param):
        i = self.bucket_of[id(param)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            for q in self.buckets[i]:
                dist.all_reduce(q.grad)
                q.grad /= self.world_size
            self.ready[i] = 0

    def finish_gradient_synchronization(self):
        pass

    @contextlib.contextmanager
    def no_sync(self):
        yield


class DDPWaitsInHook(ch14.RefDDP):
    def _grad_ready(self, param):
        super()._grad_ready(param)
        if self.pending:
            self.pending[-1][0].wait()  # waits at once: no overlap


class DDPBlockingHook(ch14.RefDDP):
    def _grad_ready(self, param):
        if not self.require_sync:
            return
        i = self.bucket_of[id(param)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
            dist.all_reduce(flat)
            flat /= self.world_size
            for q, avg in zip(
                self.buckets[i], flat.split([q.numel() for q in self.buckets[i]]), strict=True
            ):
                q.grad.copy_(avg.view_as(q))
            self.ready[i] = 0


class DDPNoWait(ch14.RefDDP):
    """Copies the buckets back without waiting (gloo is often done anyway)."""

    def finish_gradient_synchronization(self):
        for _work, flat, bucket in self.pending:
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket]), strict=True):
                q.grad.copy_(g.view_as(q) / self.world_size)
        self.pending.clear()
        self.ready = [0] * len(self.buckets)


class DDPNoWaitInPlace(DDPPerParameter):
    """All-reduces .grad in place and never waits; divides straight away."""

    def finish_gradient_synchronization(self):
        time.sleep(0.01)
        for _work, q in self.works:
            q.grad /= dist.get_world_size()
        self.works = []


class DDPAfterBackward(ch14.RefDDP):
    """No hooks at work: everything is all-reduced in finish, after backward."""

    def _grad_ready(self, param):
        pass

    def finish_gradient_synchronization(self):
        for bucket in self.buckets:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            self.pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        super().finish_gradient_synchronization()


class DDPTorch(nn.Module):
    def __init__(self, module, bucket_cap_mb=25):
        super().__init__()
        self.inner = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb)

    def forward(self, x):
        return self.inner(x)

    def no_sync(self):
        return self.inner.no_sync()

    def finish_gradient_synchronization(self):
        pass


class DDPNoSyncStuck(ch14.RefDDP):
    @contextlib.contextmanager
    def no_sync(self):
        self.require_sync = False
        yield


def test_ddp_that_sums_is_named():
    _rejects("ddp", DDPSums, r"summed, not averaged", r"2 times")


def test_ddp_without_broadcast_is_named():
    _rejects(
        "ddp", DDPNoBroadcast, r"does not broadcast the parameters from rank 0", r"rank 1 of 2"
    )


def test_ddp_that_ignores_no_sync_is_named():
    _rejects("ddp", DDPIgnoresNoSync, r"no_sync\(\) is ignored", r"all_reduce")


def test_ddp_that_waits_inside_each_hook_is_named():
    _rejects("ddp", DDPWaitsInHook, r"wait synchronously inside each hook", r"waited at once")


def test_ddp_with_blocking_hooks_is_named():
    _rejects("ddp", DDPBlockingHook, r"wait synchronously inside each hook", r"blocking")


def test_ddp_that_never_waits_is_named():
    _rejects("ddp", DDPNoWait, r"never waited", r"forgets to wait")


def test_ddp_that_never_waits_in_place_is_named():
    _rejects("ddp", DDPNoWaitInPlace, r"never waited|this rank's own", r"wait")


def test_ddp_that_communicates_after_backward_is_named():
    _rejects("ddp", DDPAfterBackward, r"no gradient collective started during backward")


def test_ddp_that_wraps_torch_ddp_is_refused():
    _rejects("ddp", DDPTorch, r"torch\.nn\.parallel\.DistributedDataParallel", r"may not")


def test_ddp_whose_no_sync_never_ends_is_named():
    _rejects("ddp", DDPNoSyncStuck, r"this rank's own, not the average")


def test_ddp_is_listed_as_a_class_exercise():
    (ex,) = [e for e in cu.exercises("14") if e.id == "ddp"]
    assert (
        ex.signature.startswith("class DDP(") and "finish_gradient_synchronization" in ex.signature
    )


# =====================================================================================
# The torchrun script
# =====================================================================================
def test_torchrun_script_trains_like_serial():
    done = torchrun("course_utils.scripts.ch14_ddp", nproc=2, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"ch14_ddp: world of 2 \(gloo\).* equal to serial training", done.stdout), (
        done.stdout
    )
