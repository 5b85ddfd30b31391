"""Chapter 15 under torchrun: train a tensor-parallel MLP language model and check it equals serial.

    torchrun --nproc-per-node 2 -m course_utils.scripts.ch15_tensor_parallel

Every rank holds a shard of the MLP (column-parallel fc1, row-parallel fc2) and of the output
layer's vocabulary, computes the loss with the vocabulary-parallel cross-entropy (two all-reduces,
the logits never gathered), and takes a few SGD steps. Each rank also trains the serial model on
the same data; rank 0 prints the largest difference in loss and parameters. gloo on CPU, nccl
when CUDA has a device per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils.checks.ch15_tensor_parallel import (
    RefParallelMLP,
    even_shard,
    ref_vocab_parallel_cross_entropy,
)


@dataclass
class Settings:
    """What the demo trains."""

    vocab: int = 32
    """vocabulary size; the world size must divide it"""
    hidden: int = 16
    """model width H"""
    ffn: int = 64
    """MLP hidden width F; the world size must divide it"""
    tokens: int = 24
    """tokens per step"""
    steps: int = 5
    """SGD steps"""
    lr: float = 0.5
    """learning rate"""
    seed: int = 0
    """seed of the weights and data (the same on every rank)"""


class VocabParallelLoss(torch.autograd.Function):
    """Mean vocabulary-parallel cross-entropy; backward: this rank's softmax columns minus one-hot."""

    @staticmethod
    def forward(
        ctx: Any, logits_shard: torch.Tensor, target: torch.Tensor, start: int
    ) -> torch.Tensor:
        loss = ref_vocab_parallel_cross_entropy(logits_shard, target, start)  # (N,)
        local = target - start
        here = (local >= 0) & (local < logits_shard.shape[1])
        picked = logits_shard.gather(1, torch.where(here, local, 0)[:, None])[:, 0]
        x_t = torch.where(here, picked, 0.0)
        dist.all_reduce(x_t)  # the target logit, held by one rank: log Z = loss + x_t
        ctx.save_for_backward(logits_shard, loss + x_t, local, here)
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits_shard, log_z, local, here = ctx.saved_tensors
        d = torch.exp(logits_shard - log_z[:, None])  # (N, V/p)
        d[torch.arange(len(local))[here], local[here]] -= 1.0
        return d * grad / len(local), None, None


class _Copy(torch.autograd.Function):
    """f: identity forward, all-reduce backward (the replicated input of the output layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def serial_loss(
    p: dict[str, torch.Tensor], ids: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The model in one process: embedding, MLP with a residual, output layer, cross-entropy."""
    x = p["emb"][ids]  # (N, H)
    x = x + F.gelu(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
    return F.cross_entropy(x @ p["head"].T, target)


def main() -> None:
    """Join the torchrun world, train tensor-parallel and serial side by side, report on rank 0."""
    cfg = Settings()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # env:// reads MASTER_ADDR and MASTER_PORT as torchrun sets them
    dist.init_process_group("nccl" if use_cuda else "gloo")
    width = even_shard(cfg.vocab, world, "vocabulary size")
    rows = slice(rank * width, (rank + 1) * width)

    gen = torch.Generator().manual_seed(cfg.seed)

    def init(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3).to(device)

    full = {
        "emb": init(cfg.vocab, cfg.hidden),
        "w1": init(cfg.ffn, cfg.hidden),
        "b1": init(cfg.ffn),
        "w2": init(cfg.hidden, cfg.ffn),
        "b2": init(cfg.hidden),
        "head": init(cfg.vocab, cfg.hidden),
    }
    serial = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    mlp = RefParallelMLP(full["w1"], full["b1"], full["w2"], full["b2"])
    emb = full["emb"].clone().requires_grad_(True)  # replicated: small, and every rank looks up
    head = full["head"][rows].clone().requires_grad_(True)  # (V/p, H): vocabulary-parallel
    params = [emb, head, *mlp.parameters()]

    for _ in range(cfg.steps):
        ids = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=gen).to(device)
        target = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=gen).to(device)
        x = emb[ids]
        x = x + mlp(x)
        loss = VocabParallelLoss.apply(_Copy.apply(x) @ head.T, target, rows.start)
        ref = serial_loss(serial, ids, target)
        for q in params + list(serial.values()):
            q.grad = None
        loss.backward()
        ref.backward()
        with torch.no_grad():
            for q in params + list(serial.values()):
                q -= cfg.lr * q.grad
    hid = slice(rank * (cfg.ffn // world), (rank + 1) * (cfg.ffn // world))
    pairs = [
        (head, serial["head"][rows]),
        (emb, serial["emb"]),
        (mlp.w1, serial["w1"][hid]),
        (mlp.b1, serial["b1"][hid]),
        (mlp.w2, serial["w2"][:, hid]),
        (mlp.b2, serial["b2"]),
    ]
    worst_here = max((a - b).abs().max().item() for a, b in pairs)
    gathered = torch.tensor([worst_here, abs(loss.item() - ref.item())], device=device)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
    worst = gathered.max().item()
    if rank == 0:
        verdict = "equals serial" if worst < 1e-10 else "DIFFERS from serial"
        print(
            f"tensor-parallel size {world} ({'nccl' if use_cuda else 'gloo'}): after {cfg.steps} "
            f"SGD steps loss {loss.item():.6f} {verdict} (max difference {worst:.1e})"
        )
    dist.destroy_process_group()
    if worst >= 1e-10:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
