"""Chapter 14 under torchrun: the ring all-reduce and the hand-built DDP on a real process group.

    torchrun --nproc-per-node 2 -m course_utils.scripts.ch14_ddp

Every rank reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the environment
(torchrun sets them) and joins the default group (gloo on CPU, nccl when there is a GPU per
rank). The ring all-reduce is compared with ``dist.all_reduce``; then a small network, seeded
differently on every rank, is trained for a few SGD steps with the course's DDP (two
micro-batches a step, the first under ``no_sync()``) and compared with serial training on the
whole batch from rank 0's initial weights. Rank 0 prints one line; any mismatch exits non-zero.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from course_utils.checks.ch14_data_parallel import RefDDP, ref_ring_all_reduce

STEPS = 5
BATCH = 4  # examples per rank per micro-batch


def make_model(seed: int, device: torch.device) -> nn.Module:
    """A small float64 MLP initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(device, torch.float64)


def main() -> int:
    """Run the demo on this rank; 0 when DDP matched serial training."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend)  # env:// from MASTER_ADDR / MASTER_PORT
    try:
        # 1. the ring all-reduce against the library's
        x = torch.arange(11, dtype=torch.float64, device=device) * (rank + 1)
        ring = ref_ring_all_reduce(x)
        builtin = x.clone()
        dist.all_reduce(builtin)
        ring_err = float((ring - builtin).abs().max())

        # 2. DDP against serial training on the whole batch
        gen = torch.Generator().manual_seed(0)
        data = [  # (step, micro-batch) -> every rank's inputs and targets
            [
                (
                    torch.randn(world * BATCH, 5, generator=gen, dtype=torch.float64),
                    torch.randn(world * BATCH, 3, generator=gen, dtype=torch.float64),
                )
                for _ in range(2)
            ]
            for _ in range(STEPS)
        ]
        model = make_model(1000 + rank, device)  # each rank differs until DDP broadcasts
        ddp = RefDDP(model, bucket_cap_mb=0.001)
        serial = make_model(1000, device)  # rank 0's initial weights
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt_serial = torch.optim.SGD(serial.parameters(), lr=0.1, momentum=0.9)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        for micro in data:
            opt.zero_grad()
            opt_serial.zero_grad()
            (x1, y1), (x2, y2) = ((a.to(device), b.to(device)) for a, b in micro)
            with ddp.no_sync():
                nn.functional.mse_loss(ddp(x1[mine]), y1[mine]).backward()
            nn.functional.mse_loss(ddp(x2[mine]), y2[mine]).backward()
            ddp.finish_gradient_synchronization()
            opt.step()
            for xb, yb in ((x1, y1), (x2, y2)):
                nn.functional.mse_loss(serial(xb), yb).backward()
            opt_serial.step()
        err = max(
            float((a - b).detach().abs().max())
            for a, b in zip(model.parameters(), serial.parameters(), strict=True)
        )
        worst = torch.tensor([err, ring_err], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        ok = bool(worst.max() < 1e-10)
        if rank == 0:
            verdict = "equal to serial training" if ok else "DIFFERENT from serial training"
            print(
                f"ch14_ddp: world of {world} ({backend}), ring all-reduce vs dist.all_reduce "
                f"{float(worst[1]):.1e}; {STEPS} DDP steps, max |DDP - serial| = "
                f"{float(worst[0]):.1e}: {verdict}",
                flush=True,
            )
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
