"""invoke_world and Tester.world: a learner's distributed function called on every rank, guarded.

The exercise here is a throwaway all-reduce that must be built from point-to-point messages;
the real ones (chapters 14-16) have their own test modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed import all_reduce as imported_all_reduce

from course_utils.checking import CheckFailure, Exercise, Tester
from course_utils.invoke_world import invoke_world, split_forbidden

FORBIDDEN = (
    "dist.all_reduce",
    "dist.all_gather",
    "dist.reduce_scatter",
    "dist.broadcast",
    "torch.nn.parallel.DistributedDataParallel",
)
EXERCISE = Exercise(
    "p2p_sum",
    "99_demo",
    "(tensor) -> Tensor",
    "demo",
    lambda t: None,
    None,
    ("tensor",),
    False,
    FORBIDDEN,
)


def ring_sum(t: torch.Tensor) -> torch.Tensor:
    """Pass every rank's tensor once around the ring, adding as it goes."""
    p, r = dist.get_world_size(), dist.get_rank()
    acc, cur = t.clone(), t.clone()
    for _ in range(p - 1):
        nxt = torch.empty_like(cur)
        req = dist.isend(cur, (r + 1) % p)
        dist.recv(nxt, (r - 1) % p)
        req.wait()
        acc, cur = acc + nxt, nxt
    return acc


def uses_all_reduce(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def uses_imported_all_reduce(t):
    t = t.clone()
    imported_all_reduce(t)
    return t


def uses_functional_collective(t):
    import torch.distributed._functional_collectives as fc

    return fc.wait_tensor(fc.all_reduce(t, "sum", dist.group.WORLD))


def uses_process_group_method(t):
    t = t.clone()
    dist.group.WORLD.allreduce([t]).wait()
    return t


def uses_all_gather_single(t):
    out = torch.empty(dist.get_world_size() * t.numel())
    dist.all_gather_into_tensor(out, t)
    return out.view(-1, t.numel()).sum(0)


def hides_the_refusal(t):
    try:
        dist.all_reduce(t.clone())
    except Exception:  # noqa: BLE001 - the planted mistake swallows the guard's refusal
        pass
    return ring_sum(t)


def wraps_torch_ddp(t):
    torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    return t


def changes_input(t):
    out = ring_sum(t)
    t.mul_(2)
    return out


def all_receive_first(t):
    buf = torch.empty_like(t)
    dist.recv(buf, (dist.get_rank() + 1) % dist.get_world_size())
    return buf


def fails_on_rank_one(t):
    if dist.get_rank() == 1:
        raise ValueError("only rank 1 fails")
    return ring_sum(t)


def not_written(t):
    raise NotImplementedError


def _tester(fn) -> Tester:
    return Tester(EXERCISE, fn, 0)


def _inputs(p: int) -> list[tuple[torch.Tensor]]:
    return [(torch.arange(4.0) + r,) for r in range(p)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_a_correct_function_returns_every_ranks_value(world_size):
    values = _tester(ring_sum).world("c", world_size, _inputs(world_size))
    want = sum(x for (x,) in _inputs(world_size))
    assert len(values) == world_size
    for v in values:
        assert torch.equal(v, want)


@pytest.mark.parametrize(
    "fn, shown",
    [
        (uses_all_reduce, "called dist.all_reduce,"),
        (uses_imported_all_reduce, "called dist.all_reduce"),
        (uses_functional_collective, "called dist.all_reduce (as torch.ops._c10d_functional"),
        (uses_process_group_method, "called dist.all_reduce (ProcessGroup.allreduce)"),
        (uses_all_gather_single, "called dist.all_gather"),
        (hides_the_refusal, "called dist.all_reduce"),
        (wraps_torch_ddp, "called DistributedDataParallel"),
    ],
)
def test_every_form_of_a_forbidden_collective_is_named(fn, shown):
    with pytest.raises(CheckFailure, match="does not allow") as err:
        _tester(fn).world("c", 2, _inputs(2))
    assert shown in str(err.value)
    assert "on rank " in str(err.value)


def test_the_guard_is_gone_after_the_world():
    # the parent process never had the guard installed, and a rank's patches die with it
    assert dist.all_reduce is imported_all_reduce


def test_an_input_changed_in_place_on_a_rank_is_named():
    with pytest.raises(
        CheckFailure, match=r"on rank \d of 3, changes_input changed its input `tensor`"
    ):
        _tester(changes_input).world("c", 3, _inputs(3))


def test_a_deadlock_names_every_rank_and_the_call_it_waits_in():
    with pytest.raises(CheckFailure, match="deadlocked") as err:
        _tester(all_receive_first).world("c", 3, _inputs(3), timeout=2.0)
    for rank, src in ((0, 1), (1, 2), (2, 0)):
        assert f"rank {rank} is waiting in dist.recv(src={src})" in str(err.value)


def test_an_error_on_one_rank_only_names_that_rank_and_line():
    with pytest.raises(
        CheckFailure,
        match=r"on rank 1 of 3, fails_on_rank_one raised ValueError: only rank 1 fails",
    ) as err:
        _tester(fails_on_rank_one).world("c", 3, _inputs(3))
    assert "line" in str(err.value)


def test_not_implemented_is_pending_not_a_failure():
    from course_utils.checking import _Pending

    with pytest.raises(_Pending):
        _tester(not_written).world("c", 2, _inputs(2))


def _double_it(fn, t):
    return {"out": fn(t) * 2, "rank": dist.get_rank()}


def test_a_probe_runs_on_every_rank_with_the_learners_function():
    values = _tester(ring_sum).world("c", 2, _inputs(2), probe=_double_it)
    assert [v["rank"] for v in values] == [0, 1]
    assert torch.equal(values[0]["out"], 2 * (_inputs(2)[0][0] + _inputs(2)[1][0]))


class _CountCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))

    def report(self) -> int:
        return self.n


def test_a_watch_reports_from_every_rank():
    tester = _tester(ring_sum)
    tester.world("c", 3, _inputs(3), watch=_CountCalls)
    assert len(tester.last_watch) == 3 and all(n > 0 for n in tester.last_watch)


def test_wrong_number_of_argument_tuples_is_a_one_line_error():
    with pytest.raises(ValueError, match="arguments for each of its ranks"):
        _tester(ring_sum).world("c", 3, _inputs(2))


def test_split_forbidden_reads_three_kinds_of_entry():
    ops, calls, classes = split_forbidden(
        ("softmax", "dist.all_reduce", "torch.nn.parallel.DistributedDataParallel")
    )
    assert ops == ("softmax",) and calls == ("all_reduce",)
    assert classes == ("torch.nn.parallel.DistributedDataParallel",)


def test_invoke_world_never_raises_for_a_world_that_cannot_start():
    out = invoke_world(ring_sum, 2, [(torch.ones(1),)] * 2, timeout=-1)
    assert out["kind"] in ("deadlock", "died")


def test_forbidden_text_names_collectives_and_classes():
    text = EXERCISE.forbidden_text()
    assert "dist.all_reduce" in text and "(torch.distributed)" in text
    assert "may not build DistributedDataParallel" in text
