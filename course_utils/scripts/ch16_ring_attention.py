"""Chapter 16 end to end: train a causal attention layer with context parallelism, equal to serial.

Launch with ``torchrun --nproc-per-node 2 -m course_utils.scripts.ch16_ring_attention``. Every
rank holds a contiguous chunk of the sequence. The forward pass is ring attention (key/value
chunks travel around the ring, merged with an online softmax); the backward pass is autograd
through the ring, with the communication made explicit: ``RingPass`` sends a chunk to the next
rank in its forward and sends the gradient back to the previous rank in its backward. After a
few SGD steps the parameters equal those of the same training in one process, and rank 0 says so.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ, BATCH, WIDTH, STEPS, LR = 24, 2, 8, 3, 0.5


class RingPass(torch.autograd.Function):
    """Forward: send x to rank r+1, return the chunk of rank r-1. Backward: the same, the other way round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        return _shift(x, +1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        # the gradient of "my chunk went to r+1" comes back from r+1
        return _shift(grad, -1)


def _shift(x: torch.Tensor, hop: int) -> torch.Tensor:
    """Send x to rank r+hop and receive the tensor that rank r-hop sends, at the same time."""
    rank, p = dist.get_rank(), dist.get_world_size()
    x = x.contiguous()
    out = torch.empty_like(x)
    reqs = [dist.isend(x, (rank + hop) % p), dist.irecv(out, (rank - hop) % p)]
    for req in reqs:
        req.wait()
    return out


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of this rank's contiguous chunk; q, k, v (B, n, d) -> (B, n, d), differentiable.

    Unlike the notebook's forward, no chunk is skipped: chunks from later ranks are folded in fully
    masked. Autograd runs a backward node only if the loss depends on it, so a skipped chunk would
    leave its RingPass without a backward on this rank while the neighbour waits for the gradient
    it should send: a deadlock. Every rank must build the same ring of RingPass nodes.
    """
    rank, p = dist.get_rank(), dist.get_world_size()
    n, d = q.shape[-2], q.shape[-1]
    rows = rank * n + torch.arange(n)[:, None]
    m = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=q.dtype)
    ell = torch.zeros_like(m)
    acc = torch.zeros_like(v)
    kv = torch.cat([k, v], -1)  # one message per step, so the backward passes come in one order
    for step in range(p):
        src = (rank - step) % p  # step 0 is the diagonal chunk, so m is finite from then on
        s = q @ kv[..., :d].transpose(-2, -1) / math.sqrt(d)
        s = s.masked_fill(src * n + torch.arange(n)[None, :] > rows, -math.inf)
        m_new = torch.maximum(
            m, s.amax(-1, keepdim=True)
        ).detach()  # any shift gives the same result
        pb, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
        ell = alpha * ell + pb.sum(-1, keepdim=True)
        acc = alpha * acc + pb @ kv[..., d:]
        m = m_new
        if step < p - 1:
            kv = RingPass.apply(kv)
    return acc / ell


def loss_fn(x: torch.Tensor, w: torch.Tensor, attend) -> torch.Tensor:  # noqa: ANN001
    """This chunk's share of the mean square of one causal self-attention layer's output.

    x (B, n, W), w (3W, W). Divided by the whole batch's element count, so the ranks' losses add
    up to the serial loss.
    """
    q, k, v = F.linear(x, w).chunk(3, -1)
    return (attend(q, k, v) ** 2).sum() / (BATCH * SEQ * WIDTH)


def main() -> None:
    """Read torchrun's environment, train STEPS steps with context parallelism, compare with serial."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)  # env:// from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    if SEQ % world:
        raise SystemExit(f"the sequence length {SEQ} is not a multiple of the world size {world}")
    torch.manual_seed(0)  # every rank draws the same data and weights
    x = torch.randn(BATCH, SEQ, WIDTH, dtype=torch.float64)
    w0 = torch.randn(3 * WIDTH, WIDTH, dtype=torch.float64) / math.sqrt(WIDTH)
    n = SEQ // world
    chunk = x[:, rank * n : (rank + 1) * n]

    def serial(q, k, v):  # noqa: ANN001, ANN202
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    w_cp, w_serial = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    for _ in range(STEPS):
        loss_cp = loss_fn(chunk, w_cp, ring_attention)
        loss_cp.backward()
        grad = w_cp.grad.clone()
        dist.all_reduce(grad)  # each rank holds its tokens' share of the weight gradient
        loss_s = loss_fn(x, w_serial, serial)
        loss_s.backward()
        with torch.no_grad():
            w_cp -= LR * grad
            w_serial -= LR * w_serial.grad
        w_cp.grad, w_serial.grad = None, None
    diff = (w_cp - w_serial).abs().max().item()
    total = loss_cp.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        print(
            f"{world} ranks ({backend}), {STEPS} SGD steps on a sequence of {SEQ}: "
            f"final loss {total.item():.6f} (serial {loss_s.item():.6f}); "
            f"max |weight difference| {diff:.1e}"
        )
        ok = diff < 1e-10 and abs(total.item() - loss_s.item()) < 1e-9 * abs(loss_s.item())
        print("ring attention matches serial attention" if ok else "MISMATCH with serial attention")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
