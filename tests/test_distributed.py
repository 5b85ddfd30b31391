"""run_world: forked gloo worlds that return every rank's result, or fail in one line, never hang."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils.distributed import WorldError, run_world


def _children() -> list[int]:
    """Pids of this process's children still in the process table, zombies included."""
    me, kids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # the second field, the command, is in parentheses and may hold spaces
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me:
            kids.append(int(entry.name))
    return kids


@pytest.fixture(autouse=True)
def no_rank_outlives_run_world():
    before = set(_children())
    yield
    assert set(_children()) <= before, "a rank outlived run_world"


def _all_reduce_sum(rank: int, world_size: int, values: torch.Tensor) -> torch.Tensor:
    mine = values[rank].clone()
    dist.all_reduce(mine)
    return mine


def test_ranks_inherit_the_optimizer_imports_and_the_batteries_do_not_load_them() -> None:
    """torch._dynamo (a second, imported by the first optimizer) is loaded before a world forks.

    Ranks that build an optimizer or torch's DDP would otherwise each import it again. Importing
    the batteries leaves it out: most processes that check never build an optimizer.
    """
    code = """
import sys
import course_utils.checks
from course_utils.distributed import run_world
print("torch._dynamo" in sys.modules)
def loaded(rank, world_size):
    return "torch._dynamo" in sys.modules
print(run_world(loaded, 2))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.split() == ["False", "[True,", "True]"], done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_all_reduce_sum_equals_the_serial_sum(world_size):
    values = torch.randn(world_size, 5, generator=torch.Generator().manual_seed(world_size))
    results = run_world(_all_reduce_sum, world_size, values)
    assert len(results) == world_size
    for got in results:
        torch.testing.assert_close(got, values.sum(0))


def test_results_come_back_in_rank_order_with_args_and_kwargs():
    def who(rank: int, world_size: int, base: int, *, scale: int) -> dict:
        return {"rank": rank, "world_size": world_size, "value": base + scale * dist.get_rank()}

    results = run_world(who, 3, 100, scale=10)
    assert results == [{"rank": r, "world_size": 3, "value": 100 + 10 * r} for r in range(3)]


def test_a_deadlock_is_reported_with_every_rank_and_its_blocking_call():
    def both_receive_first(rank: int, world_size: int) -> None:
        buf = torch.zeros(1)
        dist.recv(buf, src=1 - rank)
        dist.send(buf, dst=1 - rank)

    start = time.monotonic()
    with pytest.raises(WorldError) as info:
        run_world(both_receive_first, 2, timeout=3)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "rank 0 is waiting in dist.recv(src=1)" in message
    assert "rank 1 is waiting in dist.recv(src=0)" in message
    assert info.value.ranks == [0, 1]


def test_a_rank_that_finished_is_named_in_the_closing_barrier():
    def rank1_waits_forever(rank: int, world_size: int) -> None:
        if rank == 1:
            dist.recv(torch.zeros(1), src=0)

    with pytest.raises(
        WorldError, match="rank 0 returned and is waiting .* rank 1 is waiting in dist.recv"
    ):
        run_world(rank1_waits_forever, 2, timeout=2)


def test_a_hang_after_a_non_blocking_call_names_that_call():
    def irecv_never_matched(rank: int, world_size: int) -> None:
        if rank == 0:
            dist.irecv(torch.zeros(1), src=1).wait()

    with pytest.raises(
        WorldError, match=r"rank 0 is running fn, after dist\.irecv\(src=1\) returned"
    ):
        run_world(irecv_never_matched, 2, timeout=1.5)


def test_a_parent_with_other_threads_can_fork_a_world():
    # a Jupyter kernel has heartbeat and IOPub threads; a busy thread here stands in for them
    stop = threading.Event()
    busy = threading.Thread(target=lambda: [torch.ones(64).sum() for _ in iter(stop.is_set, True)])
    busy.start()
    try:
        assert run_world(_all_reduce_sum, 2, torch.ones(2, 3))[1].tolist() == [2.0, 2.0, 2.0]
    finally:
        stop.set()
        busy.join()


def test_the_first_rank_that_raises_is_reported_and_the_others_are_killed():
    def fails_on_rank_2(rank: int, world_size: int) -> torch.Tensor:
        if rank == 2:
            raise ValueError("shard 2 is empty")
        t = torch.ones(1)
        dist.all_reduce(t)  # the other ranks block here until they are killed or lose rank 2
        return t

    start = time.monotonic()
    with pytest.raises(WorldError) as info:
        run_world(fails_on_rank_2, 3, timeout=10)
    assert time.monotonic() - start < 5
    assert str(info.value) == "rank 2 raised ValueError: shard 2 is empty"
    assert info.value.ranks == [2]
    assert "fails_on_rank_2" in info.value.remote_traceback


def test_a_rank_that_exits_is_reported_as_dead_with_its_exit_code():
    def rank1_exits(rank: int, world_size: int) -> None:
        if rank == 1:
            os._exit(3)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(WorldError, match=r"^rank 1 died with exit code 3 before returning$"):
        run_world(rank1_exits, 2)


def test_a_result_that_cannot_be_pickled_is_an_error_of_that_rank():
    def returns_a_lambda(rank: int, world_size: int):
        return lambda: rank

    with pytest.raises(WorldError, match="^rank 0 raised .*"):
        run_world(returns_a_lambda, 1)


def test_worlds_started_one_after_the_other_do_not_collide():
    values = torch.arange(6.0).view(3, 2)
    for _ in range(5):
        for got in run_world(_all_reduce_sum, 3, values):
            torch.testing.assert_close(got, values.sum(0))


def test_sync_batchnorm_statistics_match_batchnorm_on_the_whole_batch():
    def sync_bn(rank: int, world_size: int, shards: list[torch.Tensor]) -> dict:
        x = shards[rank]  # (N_r, C, H, W)
        count = torch.full((x.shape[1],), float(x.numel() // x.shape[1]), dtype=x.dtype)
        stats = torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count])  # (3, C)
        dist.all_reduce(stats)
        mean = stats[0] / stats[2]
        var = stats[1] / stats[2] - mean * mean
        y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        return {"y": y, "mean": mean, "var": var}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2, 3, dtype=torch.float64, generator=gen) * 2 + 1
    ranks = run_world(sync_bn, 2, [x[:2], x[2:]])  # unequal shards: 2 and 3 examples
    want = F.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), want)
    for r in ranks:
        torch.testing.assert_close(r["mean"], x.mean((0, 2, 3)))
        torch.testing.assert_close(r["var"], x.var((0, 2, 3), unbiased=False))


# ---- CommCounter ---------------------------------------------------------------------------
def _count(rank: int, world_size: int) -> dict:
    from course_utils.distributed import CommCounter

    with CommCounter() as comm:
        with comm.label("reduce"):
            dist.all_reduce(torch.ones(12, dtype=torch.float64))
        with comm.label("gather"):
            out = [torch.empty(3) for _ in range(world_size)]
            dist.all_gather(out, torch.ones(3))
        with comm.label("scatter"):
            if 12 % world_size == 0:
                chunks = list(torch.ones(12, dtype=torch.float64).chunk(world_size))
                dist.reduce_scatter(torch.empty_like(chunks[0]), chunks)
        with comm.label("p2p"):
            if world_size > 1:
                req = dist.isend(torch.ones(5), (rank + 1) % world_size)
                dist.recv(torch.empty(5), (rank - 1) % world_size)
                req.wait()
    return {"by": comm.by_label(), "ops": comm.by_op(), "n": len(comm.records)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_comm_counter_counts_ring_bytes_per_label(world_size):
    p = world_size
    for rank, got in enumerate(run_world(_count, p)):
        by = got["by"]
        assert by["reduce"] == 2 * (p - 1) * 96 // p  # 12 float64 through a ring all-reduce
        assert by["gather"] == (p - 1) * 12  # p-1 chunks of 3 float32 passed on
        if 12 % p == 0:
            assert by["scatter"] == (p - 1) * 96 // p
        assert by.get("p2p", 0) == (20 if p > 1 else 0), rank


def _counter_leaves_dist_as_it_was(rank: int, world_size: int) -> bool:
    from course_utils.distributed import CommCounter

    before = dist.all_reduce
    with CommCounter():
        inside = dist.all_reduce
    return before is dist.all_reduce and inside is not before


def test_comm_counter_restores_torch_distributed():
    assert run_world(_counter_leaves_dist_as_it_was, 2) == [True, True]


def _batched_ring(rank: int, world_size: int) -> tuple[torch.Tensor, dict]:
    from course_utils.distributed import CommCounter

    with CommCounter() as comm:
        got = torch.empty(4)
        ops = [
            dist.P2POp(dist.isend, torch.full((4,), float(rank)), (rank + 1) % world_size),
            dist.P2POp(dist.irecv, got, (rank - 1) % world_size),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return got, comm.by_op()


def test_batched_p2p_ops_work_through_the_tracer_and_are_counted_once():
    # P2POp checks its op against c10d's own isend by identity: the wrappers must not break it
    for rank, (got, by_op) in enumerate(run_world(_batched_ring, 3)):
        assert torch.equal(got, torch.full((4,), float((rank - 1) % 3)))
        assert by_op == {"batch_isend_irecv": 16}
