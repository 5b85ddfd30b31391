"""Check batteries of chapter 14: the ring all-reduce and data parallelism (DDP) built by hand.

``ring_all_reduce(tensor)`` runs on every rank of forked gloo worlds of 1 to 4 ranks and each
rank's result is compared with the serial sum. When a result is wrong, the battery works out
which ranks' inputs each chunk of it holds (a least-squares fit of the chunk against the ranks'
chunks), which tells an average from a sum, a ring that stopped after its reduce-scatter from
one that mixed up its chunk indices.

``DDP`` (a class) is built inside each rank by a probe that trains a small float64 network for
a few SGD steps with gradient accumulation under ``no_sync()``; the probe watches the
collectives the class issues (when they start, whether they are asynchronous, when their
handles are waited) and returns parameters and gradients, which the battery compares with
``torch.nn.parallel.DistributedDataParallel`` trained on the same model and data by
``run_world``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checking import CheckFailure, Tester, exercise
from ..distributed import run_world

CHAPTER = "14_data_parallel"
Tensor = torch.Tensor

#: every torch.distributed collective: a ring built from point-to-point messages uses none.
COLLECTIVES = (
    "dist.all_reduce",
    "dist.all_reduce_coalesced",
    "dist.reduce",
    "dist.all_gather",
    "dist.all_gather_into_tensor",
    "dist.all_gather_coalesced",
    "dist.reduce_scatter",
    "dist.reduce_scatter_tensor",
    "dist.broadcast",
    "dist.gather",
    "dist.scatter",
    "dist.all_to_all",
    "dist.all_to_all_single",
)


# ---- references ----------------------------------------------------------------------------
def ref_ring_all_reduce(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over the default group: a ring reduce-scatter, then a ring all-gather.

    The flattened tensor is cut into p chunks (``tensor_split``: sizes differ by at most one,
    some may be empty). In reduce-scatter step s rank r sends chunk (r - s) mod p to its right
    neighbour and adds the chunk (r - s - 1) mod p it receives from its left; after p - 1 steps
    it holds the full sum of chunk (r + 1) mod p. The all-gather passes the finished chunks
    round the ring for p - 1 more steps. Each rank sends 2 (p - 1) / p of the tensor in all.
    """
    p, r = dist.get_world_size(), dist.get_rank()
    flat = tensor.detach().reshape(-1).clone()  # (N,), the input stays untouched
    chunks = list(flat.tensor_split(p))  # views into flat
    right, left = (r + 1) % p, (r - 1) % p
    for s in range(p - 1):  # reduce-scatter
        send_i, recv_i = (r - s) % p, (r - s - 1) % p
        incoming = torch.empty_like(chunks[recv_i])
        # isend first: a blocking send on every rank would wait for a recv nobody has posted yet
        request = dist.isend(chunks[send_i], right)
        dist.recv(incoming, left)
        request.wait()
        chunks[recv_i] += incoming
    for s in range(p - 1):  # all-gather
        send_i, recv_i = (r + 1 - s) % p, (r - s) % p
        request = dist.isend(chunks[send_i], right)
        dist.recv(chunks[recv_i], left)
        request.wait()
    return flat.reshape(tensor.shape)


class RefDDP(nn.Module):
    """Data parallelism by hand: broadcast at construction, bucketed asynchronous all-reduces.

    ``RefDDP(module, bucket_cap_mb=25)``; call it like ``module``. Gradient hooks
    (``register_post_accumulate_grad_hook``) mark parameters ready; a bucket whose parameters
    are all ready is flattened and all-reduced with ``async_op=True`` while backward goes on.
    ``finish_gradient_synchronization()`` waits for every bucket, divides by the world size and
    copies the averages back into ``.grad``; call it after backward, before ``opt.step()``.
    Inside ``with ddp.no_sync():`` the hooks do nothing, so gradients accumulate locally.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0) -> None:
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self.require_sync = True
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)  # every rank starts from rank 0's weights
        params = [q for q in module.parameters() if q.requires_grad]
        # Backward produces gradients roughly in reverse order of definition: bucket that way.
        self.buckets: list[list[nn.Parameter]] = [[]]
        cap, size = bucket_cap_mb * 1024 * 1024, 0
        for param in reversed(params):
            nbytes = param.numel() * param.element_size()
            if self.buckets[-1] and size + nbytes > cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += nbytes
        self.bucket_of = {id(q): i for i, b in enumerate(self.buckets) for q in b}
        self.ready = [0] * len(self.buckets)
        self.pending: list[tuple[Any, Tensor, list[nn.Parameter]]] = []
        for param in params:
            param.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward."""
        return self.module(*args, **kwargs)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.require_sync:
            return
        i = self.bucket_of[id(param)]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):  # the whole bucket is ready: launch it
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])  # (bucket numel,)
            work = dist.all_reduce(flat, async_op=True)
            self.pending.append((work, flat, self.buckets[i]))

    def finish_gradient_synchronization(self) -> None:
        """Wait for every bucket's all-reduce and write the averaged gradients into ``.grad``."""
        for work, flat, bucket in self.pending:
            work.wait()
            flat /= self.world_size
            for param, avg in zip(bucket, flat.split([q.numel() for q in bucket]), strict=True):
                param.grad.copy_(avg.view_as(param))
        self.pending.clear()
        self.ready = [0] * len(self.buckets)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients computed inside accumulate locally; the next synced backward averages the sum."""
        saved, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = saved


# ---- ring all-reduce ------------------------------------------------------------------------
def _contributions(chunk: Tensor, parts: list[Tensor]) -> Tensor | None:
    """Coefficients c with chunk ~= sum_k c_k parts[k] (least squares), or None if unidentifiable."""
    if chunk.numel() < len(parts) + 2:
        return None
    a = torch.stack([q.double().reshape(-1) for q in parts], 1)  # (n, p)
    b = chunk.detach().double().reshape(-1, 1)  # (n, 1)
    c = torch.linalg.lstsq(a, b).solution.reshape(-1)  # (p,)
    fit = a @ c
    if (fit - b.reshape(-1)).abs().max() > 1e-6 * (1 + b.abs().max()):
        return None
    return c


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(
        torch.allclose(
            a.detach().double(),
            b,
            rtol=1e-5,
            atol=1e-5 * (1 + (float(b.abs().max()) if b.numel() else 0.0)),
        )
    )


def _cross_chunk(outs: list[Any], parts: list[list[Tensor]], unfit: list[tuple[int, int]]) -> str:
    """If a chunk of the result holds data of another chunk index, say which (equal chunks only)."""
    p = len(parts)
    if not unfit or len({q.numel() for q in parts[0]}) != 1:
        return ""
    everything = [parts[k][j] for k in range(p) for j in range(p)]  # rank k, chunk j
    for r, i in unfit:
        c = _contributions(outs[r].reshape(-1).tensor_split(p)[i], everything)
        if c is None:
            continue
        foreign = [
            (k, j) for k in range(p) for j in range(p) if j != i and abs(float(c[k * p + j])) > 1e-6
        ]
        if foreign:
            k, j = foreign[0]
            return (
                f"It looks like the chunk indices are mixed up: on rank {r}, chunk {i} of the result "
                f"holds data of chunk {j} (from rank {k}), so the ring added or forwarded the wrong "
                "chunk. In reduce-scatter step s rank r sends chunk (r - s) mod p and adds into "
                "chunk (r - s - 1) mod p; in all-gather step s it sends chunk (r + 1 - s) mod p and "
                "receives chunk (r - s) mod p."
            )
    return ""


def _ring_diagnosis(outs: list[Any], xs: list[Tensor]) -> str:
    """Name the mistake the wrong results look like, from which ranks each chunk sums."""
    p = len(xs)
    if p == 1:
        return ""
    n = xs[0].numel()
    head = (n // p) * p
    total = torch.stack([x.double().reshape(-1) for x in xs]).sum(0)  # (N,)
    if n % p and all(
        torch.is_tensor(o) and o.numel() == n and _close(o.reshape(-1)[:head], total[:head])
        for o in outs
    ):
        return (
            f"It looks like it only works when the size divides by p: the first {head} elements "
            f"are right but the last {n % p} element(s) (numel {n} mod p = {p}) were never "
            "reduced. Cut the flattened tensor with tensor_split(p), whose chunks may differ in "
            "size by one."
        )
    parts = [list(x.reshape(-1).tensor_split(p)) for x in xs]
    coeffs: dict[tuple[int, int], Tensor | None] = {}
    for r, out in enumerate(outs):
        if not torch.is_tensor(out) or out.numel() != xs[0].numel():
            return ""
        for i, chunk in enumerate(out.reshape(-1).tensor_split(p)):
            coeffs[r, i] = _contributions(chunk, [parts[k][i] for k in range(p)])
    mixed = _cross_chunk(outs, parts, [key for key, c in coeffs.items() if c is None])
    if mixed:
        return mixed
    known = {key: c for key, c in coeffs.items() if c is not None}
    if not known:
        return ""

    def near(c: Tensor, value: float) -> bool:
        return bool((c - value).abs().max() < 1e-6)

    if all(near(c, 1.0 / p) for c in known.values()):
        return (
            f"It looks like the ring averages instead of summing: every entry is the sum divided by "
            f"p = {p}. ring_all_reduce returns the plain sum (DDP divides by p afterwards)."
        )
    owned = {
        r: [i for i in range(p) if (r, i) in known and near(known[r, i], 1.0)] for r in range(p)
    }
    if all(len(owned[r]) == 1 for r in range(p)) and len({owned[r][0] for r in range(p)}) == p:
        who = ", ".join(f"rank {r} chunk {owned[r][0]}" for r in range(p))
        return (
            "It looks like the ring skips the all-gather: each rank holds the full sum of only one "
            f"chunk ({who}) and partial sums elsewhere. After the p - 1 reduce-scatter steps, pass "
            "the finished chunks round the ring for p - 1 more steps."
        )
    odd = [(r, i, c) for (r, i), c in known.items() if not near(c, 1.0)]
    if odd:
        r, i, c = odd[0]
        weights = ", ".join(f"{float(v):.3g}" for v in c)
        return (
            f"It looks like the chunk indices are mixed up: on rank {r}, chunk {i} is a sum of the "
            f"ranks' chunks {i} with weights ({weights}) instead of all ones, so some ranks' data "
            "were added twice and others never. In reduce-scatter step s rank r sends chunk "
            "(r - s) mod p and adds into chunk (r - s - 1) mod p; in all-gather step s it sends "
            "chunk (r + 1 - s) mod p and receives chunk (r - s) mod p."
        )
    return ""


def _ring_cases(t: Tester) -> list[tuple[str, int, list[Tensor]]]:
    """(case, world size, per-rank inputs): sizes dividing by p first, then uneven and tiny ones."""
    f32 = torch.float32
    cases = []
    for p in (1, 2, 3, 4):
        shapes = [
            (f"(12, 5) float64, numel 60 divides by p={p}", (12, 5), torch.float64),
            (
                f"(7, 3) float64, numel 21 {'divides' if 21 % p == 0 else 'does not divide'} by p={p}",
                (7, 3),
                torch.float64,
            ),
            (f"(1001,) float32, numel 1001 with p={p}", (1001,), f32),
            (f"(2,) float64, numel 2 with p={p}", (2,), torch.float64),
            (f"0-d float64 with p={p}", (), torch.float64),
        ]
        for name, shape, dtype in shapes:
            xs = [t.randn(*shape or (1,), dtype=dtype).reshape(shape) for _ in range(p)]
            cases.append((f"{name}, world of {p} ranks", p, xs))
    return cases


def _ring_divides(case: str) -> bool:
    return "divides by" in case and "does not" not in case


@exercise(
    "ring_all_reduce",
    chapter=CHAPTER,
    signature="(tensor) -> Tensor",
    summary="distributed: the sum of tensor over all ranks of the default group with point-to-point "
    "messages only (send/recv/isend/irecv), as a ring reduce-scatter then a ring all-gather; any numel; "
    "the input is left untouched",
    reference=ref_ring_all_reduce,
    forbidden=COLLECTIVES,
    budget=10.0,
)
def _check_ring_all_reduce(t: Tester) -> None:
    even_ok: list[str] = []
    for case, p, xs in _ring_cases(t):
        expected = torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)  # serial sum
        try:
            outs = t.world(case, p, [(x,) for x in xs])
        except CheckFailure as failure:
            text = str(failure)
            if not _ring_divides(case) and even_ok and "deadlocked" not in text:
                text += (
                    f" It passed the cases whose size divides by the world size ({even_ok[0]}) "
                    "and fails on this one: it looks like it only works when the size divides by "
                    "p. Cut the flattened tensor with tensor_split(p), whose chunks may differ in "
                    "size by one and may be empty."
                )
            raise CheckFailure(text) from None
        for r, out in enumerate(outs):
            quantity = f"result on rank {r}"
            if torch.is_tensor(out) and out.numel() < expected.numel() and not _ring_divides(case):
                t.fail(
                    case,
                    f"`{quantity}` has {out.numel()} elements, the input {expected.numel()}: it "
                    "looks like it only works when the size divides by p (the remainder was "
                    "dropped). Cut the flattened tensor with tensor_split(p).",
                )
            try:
                t.compare(case, quantity, out, expected, generic_hints=False)
            except CheckFailure as failure:
                hint = _ring_diagnosis(outs, xs)
                raise CheckFailure(f"{failure} {hint}".strip()) from None
        if _ring_divides(case):
            even_ok.append(case)


# ---- DDP -------------------------------------------------------------------------------------
#: collectives a DDP may use to move gradients; the watch records each call and its handle.
_GRADIENT_OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather",
    "all_gather_into_tensor",
    "reduce",
    "broadcast",
)


class _Handle:
    """A collective's work handle, passed through, that records when it is waited."""

    def __init__(self, work: Any, record: dict, watch: _CollectiveWatch) -> None:
        self._work, self._record, self._watch = work, record, watch

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._watch.waited(self._record)
        return self._work.wait(*args, **kwargs)

    def get_future(self) -> Any:
        # a learner may wait through the future instead; count asking for it as waiting
        self._watch.waited(self._record)
        return self._work.get_future()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _CollectiveWatch:
    """Records every gradient collective: its phase, whether it was asynchronous, when waited."""

    def __init__(self) -> None:
        self.phase = "construction"
        self.calls: list[dict] = []
        self._saved: list[tuple[str, Any]] = []

    def __enter__(self) -> _CollectiveWatch:
        for name in _GRADIENT_OPS:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved.append((name, original))
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved:
            setattr(dist, name, original)

    def waited(self, record: dict) -> None:
        """Note that ``record``'s handle was waited now: in which phase, after how many launches."""
        if not record["waited"]:
            record["waited"], record["launches_before_wait"] = self.phase, len(self.calls)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            record = {"op": name, "phase": self.phase, "async": False, "waited": ""}
            record["index"], record["launches_before_wait"] = len(self.calls), -1
            self.calls.append(record)
            work = original(*args, **kwargs)
            if work is None:  # a blocking call: done when it returns
                self.waited(record)
                return work
            record["async"] = True
            return _Handle(work, record, self)

        return recorded


class _Net(nn.Module):
    """A small float64 MLP: six parameter tensors, 122 numbers, so tiny buckets split it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7, dtype=torch.float64)
        self.fc2 = nn.Linear(7, 7, dtype=torch.float64)
        self.fc3 = nn.Linear(7, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _ddp_data(seed: int, world_size: int, steps: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Per rank, per micro-batch (two per step): inputs (4, 5) and targets (4, 3)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.randn(4, 5, generator=gen, dtype=torch.float64),
                torch.randn(4, 3, generator=gen, dtype=torch.float64),
            )
            for _ in range(2 * steps)
        ]
        for _ in range(world_size)
    ]


def _train(
    wrap: Callable[[nn.Module], nn.Module],
    rank: int,
    batches: list[tuple[Tensor, Tensor]],
    steps: int,
    finish: bool,
    watch: _CollectiveWatch | None = None,
) -> dict:
    """Train on this rank: each step accumulates two micro-batches, the first under no_sync()."""
    torch.manual_seed(1000 + rank)  # every rank initialises differently: construction must fix that
    model = _Net()
    watch = watch or _CollectiveWatch()
    watch.phase = "construction"
    ddp = wrap(model)
    init = [q.detach().clone() for q in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads, local = [], []
    for step in range(steps):
        opt.zero_grad()
        x1, y1 = batches[2 * step]
        x2, y2 = batches[2 * step + 1]
        with ddp.no_sync():
            watch.phase = "no_sync backward"
            nn.functional.mse_loss(ddp(x1), y1).backward()
        with torch.no_grad():  # this rank's own accumulated gradient, for the diagnosis
            copy = _Net()
            copy.load_state_dict(model.state_dict())
        watch.phase = "backward"
        nn.functional.mse_loss(ddp(x2), y2).backward()
        watch.phase = "finish_gradient_synchronization"
        if finish:
            ddp.finish_gradient_synchronization()
        watch.phase = "step"
        grads.append([q.grad.detach().clone() for q in model.parameters()])
        copy.zero_grad()
        nn.functional.mse_loss(copy(x1), y1).backward()
        nn.functional.mse_loss(copy(x2), y2).backward()
        local.append([q.grad.detach().clone() for q in copy.parameters()])
        opt.step()
    params = [q.detach().clone() for q in model.parameters()]
    return {"init": init, "grads": grads, "local": local, "params": params}


def _ddp_probe(
    DDP: type, batches: list[tuple[Tensor, Tensor]], steps: int, bucket_cap_mb: float
) -> dict:
    """Inside one rank: build the learner's DDP, train, return tensors and what the watch saw."""
    rank = dist.get_rank()
    with _CollectiveWatch() as watch:
        out = _train(
            lambda m: DDP(m, bucket_cap_mb=bucket_cap_mb), rank, batches, steps, True, watch
        )
    out["calls"] = watch.calls
    return out


def _torch_ddp_rank(
    rank: int, world_size: int, data: list, steps: int, bucket_cap_mb: float
) -> dict:
    """The same training with torch's DistributedDataParallel (gloo, CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    return _train(
        lambda m: DistributedDataParallel(m, bucket_cap_mb=bucket_cap_mb),
        rank,
        data[rank],
        steps,
        False,
    )


_DDP_CASES = (
    (1, 25.0),
    (2, 0.0004),
    (4, 0.0004),
)  # (world size, bucket_cap_mb): 0.0004 MB ~ 3 buckets
_DDP_STEPS = 3


@exercise(
    "ddp",
    chapter=CHAPTER,
    signature=(
        "class DDP(nn.Module): __init__(module, bucket_cap_mb=25), forward(*args, **kwargs), no_sync() "
        "context manager, finish_gradient_synchronization() called after backward and before opt.step()"
    ),
    summary="distributed data parallelism: parameters broadcast from rank 0 at construction; gradients "
    "averaged in buckets by asynchronous all-reduces launched from post-accumulate-grad hooks during "
    "backward and waited in finish_gradient_synchronization(); no_sync() accumulates locally",
    reference=RefDDP,
    forbidden=("torch.nn.parallel.DistributedDataParallel",),
    budget=10.0,
)
def _check_ddp(t: Tester) -> None:
    for p, cap in _DDP_CASES:
        case = (
            f"world of {p} ranks, bucket_cap_mb={cap:g}, {_DDP_STEPS} SGD steps of 2 micro-batches"
        )
        data = _ddp_data(t.seed * 100 + p, p, _DDP_STEPS)
        want = run_world(_torch_ddp_rank, p, data, _DDP_STEPS, cap, timeout=20.0)
        got = t.world(
            case,
            p,
            [(data[r], _DDP_STEPS, cap) for r in range(p)],
            probe=_ddp_probe,
            timeout=10.0,
        )
        _judge_ddp(t, case, p, got, want)


def _same(a: list[Tensor], b: list[Tensor], tol: float = 1e-9) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and bool(torch.allclose(x, y, rtol=tol, atol=tol))
        for x, y in zip(a, b, strict=True)
    )


def _judge_ddp(t: Tester, case: str, p: int, outs: list[Any], wants: list[dict]) -> None:
    """Judge every rank, one property at a time, the most telling first."""
    ranks = [
        (r, f"rank {r} of {p}", out, want)
        for r, (out, want) in enumerate(zip(outs, wants, strict=True))
    ]
    for _r, where, out, _want in ranks:
        if not isinstance(out, dict):
            t.fail(case, f"the probe on {where} returned {type(out).__name__}.")
    if p > 1:
        for _r, where, out, want in ranks:
            if not _same(out["init"], want["init"]):
                t.fail(
                    case,
                    f"right after construction the parameters on {where} differ from rank 0's: it "
                    "looks like DDP does not broadcast the parameters from rank 0 at construction "
                    "(each rank initialised its model with its own seed, as separate processes "
                    "do). Call dist.broadcast(param.data, src=0) for every parameter (and buffer) "
                    "in __init__.",
                )
        t.ok(case, "parameters equal to rank 0's after construction, every rank")
    calls = {r: [c for c in out["calls"] if c["phase"] != "construction"] for r, _, out, _ in ranks}
    if p > 1:
        for r, where, _out, _want in ranks:
            in_no_sync = [c for c in calls[r] if c["phase"] == "no_sync backward"]
            if in_no_sync:
                t.fail(
                    case,
                    f"on {where}, {len(in_no_sync)} collective call(s) ({in_no_sync[0]['op']}) ran "
                    "during a backward inside no_sync(): it looks like no_sync() is ignored. Inside "
                    "no_sync() the hooks must do nothing, so gradients accumulate locally.",
                )
            unwaited = [c for c in calls[r] if c["async"] and not c["waited"]]
            if unwaited:
                t.fail(
                    case,
                    f"on {where} {len(unwaited)} asynchronous {unwaited[0]['op']} handle(s) were "
                    "never waited: it looks like finish_gradient_synchronization() forgets to wait "
                    "before the optimizer step. Call work.wait() on every handle before reading the "
                    "averaged gradients.",
                )
    for _r, where, out, want in ranks:
        want_grads, grads = want["grads"][0], out["grads"][0]
        if _same(grads, want_grads):
            continue
        if p > 1 and _same(grads, [g * p for g in want_grads]):
            t.fail(
                case,
                f"on {where} the gradients at opt.step() are {p} times the averaged ones: it looks "
                "like the gradients are summed, not averaged. Divide the all-reduced sum by the "
                "world size.",
            )
        if p > 1 and _same(grads, out["local"][0]):
            t.fail(
                case,
                f"on {where} the gradients at opt.step() are this rank's own, not the average over "
                "ranks: the all-reduced values never reached .grad. It looks like "
                "finish_gradient_synchronization() does not wait for the all-reduce handles (or "
                "does not copy the bucket back into .grad), or no_sync() left syncing switched off.",
            )
        worst = max(float((a - b).abs().max()) for a, b in zip(grads, want_grads, strict=True))
        t.fail(
            case,
            f"on {where} the gradients at the first opt.step() differ from torch DDP's by up to "
            f"{worst:.3g}.",
        )
    t.ok(case, "gradients at the first step equal torch DDP's, every rank")
    for r, where, _out, _want in ranks:
        if p == 1:
            break
        if not calls[r]:
            t.ok(case, f"collectives not observed (called by another name), {where}", "skipped")
            continue
        launched = [c for c in calls[r] if c["phase"] == "backward"]
        if not launched:
            t.fail(
                case,
                f"on {where} no gradient collective started during backward (the first ran in "
                f"{calls[r][0]['phase']}): the all-reduces must be launched from the gradient hooks "
                "(register_post_accumulate_grad_hook) while backward is still running, so "
                "communication overlaps computation.",
            )
        # waiting inside each hook: every collective is finished before the next one starts
        one_at_a_time = all(c["launches_before_wait"] == c["index"] + 1 for c in launched[:-1])
        if len(launched) >= 2 and one_at_a_time:
            how = "blocking" if not any(c["async"] for c in launched) else "waited at once"
            t.fail(
                case,
                f"on {where} the {len(launched)} gradient all-reduces launched during backward ran "
                f"one at a time (each {how} before the next started): it looks like the hooks wait "
                "synchronously inside each hook, so communication never overlaps backward. Launch "
                "with async_op=True, keep the handle, and wait in finish_gradient_synchronization().",
            )
        t.ok(case, f"async all-reduces launched in backward, waited before the step, {where}")
    for _r, where, out, want in ranks:
        for i, (a, b) in enumerate(zip(out["params"], want["params"], strict=True)):
            t.compare(case, f"parameter {i} after {_DDP_STEPS} steps, {where}", a, b)
