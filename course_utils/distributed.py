"""Run a function on a small ``torch.distributed`` world of forked processes, and never hang.

``run_world(fn, world_size, *args)`` forks ``world_size`` ranks, each joins a real gloo process
group on this machine and calls ``fn(rank, world_size, *args, **kwargs)``; the results come back
as a list in rank order. Because the ranks are forked, ``fn`` may be defined in a notebook cell.
A rank that raises, dies or blocks past ``timeout`` becomes a one-line ``WorldError`` naming the
rank and, for a hang, the ``torch.distributed`` call it is blocked in; every rank is killed and
reaped before ``run_world`` returns or raises.

``CommCounter`` counts, inside a rank, the bytes each torch.distributed call sends, so a
chapter can set the traffic it measured beside the traffic it derived.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import inspect
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

#: the torch.distributed calls whose entry and exit each rank records, so a hang can be named.
TRACED_CALLS = (
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "gather",
    "scatter",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)
_SLOT = 160  # bytes of shared memory per rank for "where it is now"
_GRACE = 0.3  # seconds to wait for the other ranks' reports once one rank has failed


class WorldError(RuntimeError):
    """A rank of a ``run_world`` world raised, died or did not finish in time."""

    def __init__(
        self, message: str, ranks: list[int], remote_traceback: str = "", report: Any = None
    ) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.remote_traceback = remote_traceback
        # what the failing rank attached to its exception as ``course_report`` (the checker's
        # guarded calls send their outcome this way), else None
        self.report = report


def load_optimizer_machinery() -> None:
    """Build a throwaway torch optimizer, so that this process pays its one-time imports now.

    The first optimizer a process builds imports torch._dynamo (about a second). ``run_world``
    calls this before it forks, so ranks that build an optimizer or torch's DDP inherit it
    instead of each importing it again; the batteries that build optimizers call it first.
    Processes that never do either (most kernels and grading processes) never pay it.
    """
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 10.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on each rank of a forked world; results by rank.

    Each rank is a forked process in the default process group (``backend``, default gloo, on
    this machine), so ``fn`` may use ``dist.get_rank()`` as well; ``fn`` cannot take keyword
    arguments named ``timeout`` or ``backend``. Results must be picklable (tensors and plain
    data). ``timeout`` (seconds) bounds the whole run, start-up included. Raises ``WorldError``
    for the first rank that raises, a rank that dies, or, after ``timeout``, the ranks still
    running and where each is blocked.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    load_optimizer_machinery()
    # fork, not spawn: the ranks inherit fn, so a function defined in a notebook cell works
    # without being importable or picklable. Forking a process that has other threads (a Jupyter
    # kernel's heartbeat and IOPub threads, torch's thread pools) copies only the calling thread;
    # that is safe here because a rank touches nothing those threads own: it uses torch with one
    # thread, its own sockets and its pipe, and leaves with os._exit, so no inherited lock or
    # atexit handler ever runs in it.
    ctx = mp.get_context("fork")
    # The rendezvous goes through a file, not a TCP store: on this course's sandboxes a TCP
    # store's clients sometimes waited 5 s to connect right after a killed world. The ranks still
    # talk to each other over gloo's TCP pairs on 127.0.0.1.
    folder = tempfile.TemporaryDirectory(prefix="course_world_")
    rendezvous = os.path.join(folder.name, "store")
    where = ctx.Array(ctypes.c_char, world_size * _SLOT, lock=False)  # shared, one slot per rank
    procs: list[mp.process.BaseProcess] = []
    conns: dict[int, Connection] = {}
    try:
        for rank in range(world_size):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    rank,
                    world_size,
                    rendezvous,
                    backend,
                    timeout,
                    where,
                    sender,
                    args,
                    kwargs,
                ),
                name=f"rank{rank}",
                daemon=True,
            )
            proc.start()
            sender.close()  # the parent keeps only the read end, so EOF means the rank is gone
            procs.append(proc)
            conns[rank] = receiver
        return _collect(procs, conns, where, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
            proc.close()
        for conn in conns.values():
            conn.close()
        folder.cleanup()


def _collect(
    procs: list[mp.process.BaseProcess],
    conns: dict[int, Connection],
    where: Any,
    timeout: float,
) -> list[Any]:
    """Wait for every rank's report or exit; return the results or raise the first failure."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, str, str, Any]] = {}  # rank -> (when, line, traceback, report)
    dead: dict[int, int] = {}  # rank -> exit code, for ranks gone without a report
    pending = set(range(world_size))
    failed_at: float | None = None
    while pending:
        now = time.monotonic()
        end = deadline if failed_at is None else min(deadline, failed_at + _GRACE)
        if now >= end:
            break
        ready = set(
            wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], end - now)
        )
        for rank in sorted(pending):
            # a rank writes its report before it exits, so a readable pipe is read first: it
            # holds either the report or, once the rank is gone without one, end-of-file
            conn, proc = conns[rank], procs[rank]
            if conn not in ready and proc.sentinel not in ready:
                continue
            if not conn.poll():
                continue  # exited but the pipe is not yet readable: next round
            pending.discard(rank)
            try:
                kind, when, payload, tb, report = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                proc.join()
                dead[rank] = proc.exitcode
                continue
            if kind == "ok":
                results[rank] = payload
            else:
                errors[rank] = (when, payload, tb, report)
        if (errors or dead) and failed_at is None:
            failed_at = time.monotonic()
    if dead:
        # a dead rank takes its sockets down, so the errors its peers raise are consequences
        rank = min(dead)
        raise WorldError(f"rank {rank} {_describe_exit(dead[rank])} before returning", [rank])
    if errors:
        # CLOCK_MONOTONIC is shared by all processes, so the earliest error is the first cause
        rank = min(errors, key=lambda r: errors[r][0])
        _, line, tb, report = errors[rank]
        err = WorldError(f"rank {rank} raised {line}", [rank], tb, report)
        if tb and hasattr(err, "add_note"):  # Python 3.11+: shown under the one-line message
            err.add_note(f"Traceback on rank {rank}:\n{tb.rstrip()}")
        raise err
    if pending:
        stuck = sorted(pending)
        places = ", ".join(f"rank {r} {_read_slot(where, r)}" for r in stuck)
        raise WorldError(f"world of {world_size} did not finish in {timeout:g} s: {places}", stuck)
    return [results[r] for r in range(world_size)]


def _describe_exit(code: int | None) -> str:
    """'died with exit code 3' or 'was killed by SIGSEGV'."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"died with exit code {code}"


def _read_slot(where: Any, rank: int) -> str:
    """The last state rank ``rank`` recorded, as text."""
    raw = bytes(where[rank * _SLOT : (rank + 1) * _SLOT]).split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace") or "had not started"


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    rendezvous: str,
    backend: str,
    timeout: float,
    where: Any,
    conn: Connection,
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of one forked rank: join the group, call fn, report, and leave with os._exit."""
    code = 0

    def note(text: str) -> None:
        data = text.encode("utf-8", "replace")[: _SLOT - 1] + b"\0"
        where[rank * _SLOT : rank * _SLOT + len(data)] = data

    try:
        # tiny tensors, and two cores shared by every rank: more threads only fight each other
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
        note("is in dist.init_process_group")
        # gloo's own timeout is longer than the parent's, so a hang is reported by the parent,
        # which can say where every rank is, rather than by one rank's bare gloo timeout
        dist.init_process_group(
            backend,
            store=dist.FileStore(rendezvous, world_size),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout + 30),
        )
        # every pair connected before any rank may fail and leave: a peer still connecting
        # would report the lost connection instead of the failure
        dist.barrier()
        _trace_calls(note)
        note("is running fn (no torch.distributed call yet)")
        result = fn(rank, world_size, *args, **kwargs)
        note("returned and is waiting for the others in the closing barrier")
        _untraced(dist.barrier)()  # no rank tears the group down while a peer still reads from it
        dist.destroy_process_group()
        message = pickle.dumps(("ok", time.monotonic(), result, "", None))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        when = time.monotonic()
        line = " ".join(f"{type(exc).__name__}: {exc}".split())
        report = getattr(exc, "course_report", None)
        try:
            message = pickle.dumps(("error", when, line, traceback.format_exc(), report))
        except Exception:  # noqa: BLE001 - an unpicklable report still leaves the line
            message = pickle.dumps(("error", when, line, traceback.format_exc(), None))
        code = 1
    try:
        conn.send_bytes(message)
    except (pickle.PicklingError, OSError) as exc:
        code = 2
        sys.stderr.write(f"rank {rank} could not report: {exc}\n")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # skip interpreter shutdown: the inherited atexit handlers and locks belong to the parent
        os._exit(code)


def _untraced(call: Callable[..., Any]) -> Callable[..., Any]:
    """The original torch.distributed function behind the course's recording wrappers."""
    while getattr(call, "_course_traced", False):
        call = call.__wrapped__
    return call


def _p2p_ops_accept_wrappers() -> None:
    """Let ``dist.P2POp(dist.isend, ...)`` take a recording wrapper of isend/irecv.

    P2POp and batch_isend_irecv compare ``op`` with c10d's own isend/irecv by identity, so a
    wrapped ``dist.isend`` would be refused (or taken for a receive). The op is unwrapped
    where it is stored; ``batch_isend_irecv`` itself is traced and counted instead.
    """
    c10d = dist.distributed_c10d
    if getattr(c10d._check_op, "_course_unwraps", False):
        return
    check, init = c10d._check_op, c10d.P2POp.__init__

    def check_op(op: Any) -> None:
        check(_untraced(op))

    @functools.wraps(init)
    def p2p_init(self: Any, op: Any, *args: Any, **kwargs: Any) -> None:
        init(self, _untraced(op), *args, **kwargs)

    check_op._course_unwraps = True
    c10d._check_op = check_op
    c10d.P2POp.__init__ = p2p_init


def _trace_calls(note: Callable[[str], None]) -> None:
    """Replace torch.distributed's communication calls, in this rank only, by recording twins."""
    _p2p_ops_accept_wrappers()
    for name in TRACED_CALLS:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_course_traced", False):
            continue
        setattr(dist, name, _traced(name, original, note))


def _traced(name: str, original: Callable[..., Any], note: Callable[[str], None]) -> Callable:
    """``original`` recording 'is waiting in dist.recv(src=0)' on entry and the return on exit."""
    try:
        signature: inspect.Signature | None = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = f"dist.{name}({_peer(signature, args, kwargs)})"
        note(f"is waiting in {call}")
        out = original(*args, **kwargs)
        # a non-blocking call returns at once; its wait() is then the likely place of a hang
        note(f"is running fn, after {call} returned")
        return out

    wrapper._course_traced = True  # torch's own decorators set __wrapped__ too: not a marker
    return wrapper


def _peer(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> str:
    """'src=0' or 'dst=1' for a point-to-point or rooted call, '' for the others."""
    if signature is None:
        return ""
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return ""
    for key in ("src", "dst", "group_src", "group_dst"):
        if key in bound:
            value = bound[key]
            return f"{key}={'any' if value is None else value}"
    return ""


# ---- counting communication ----------------------------------------------------------------
#: The torch.distributed calls a CommCounter counts.
COUNTED_CALLS = tuple(c for c in TRACED_CALLS if c != "barrier")


def _nbytes(x: Any) -> int:
    """Bytes of a tensor, or of every tensor in a list of them."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


def _numel(x: Any) -> int:
    if torch.is_tensor(x):
        return x.numel()
    if isinstance(x, list | tuple):
        return sum(_numel(t) for t in x)
    return 0


def _ring_cost(op: str, a: dict[str, Any], rank: int, p: int) -> tuple[Any, int]:
    """(the tensor(s) the call is about, bytes this rank sends) under the bandwidth-optimal ring."""

    def root(key: str) -> int:
        value = a.get(key)
        if value is None:
            value = a.get(f"group_{key}")
        return 0 if value is None else int(value)

    if op in ("send", "isend"):
        return a["tensor"], _nbytes(a["tensor"])
    if op == "batch_isend_irecv":  # the ops were unwrapped when built: count the sends here
        sends = [
            o.tensor for o in a["p2p_op_list"] if _untraced(o.op) is dist.distributed_c10d.isend
        ]
        return [o.tensor for o in a["p2p_op_list"]], _nbytes(sends)
    if op in ("recv", "irecv"):
        return a["tensor"], 0
    if op == "all_reduce":  # reduce-scatter then all-gather: 2(p-1) chunks of n/p
        t = a["tensor"]
        return t, 2 * (p - 1) * _nbytes(t) // p
    if op == "all_gather":  # each rank passes on p-1 chunks of its input's size
        return a["tensor"], (p - 1) * _nbytes(a["tensor"])
    if op in ("all_gather_into_tensor", "all_gather_single"):
        return a["input_tensor"], (p - 1) * _nbytes(a["input_tensor"])
    if op == "reduce_scatter":
        return a["input_list"], (p - 1) * _nbytes(a["output"])
    if op in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return a["input"], (p - 1) * _nbytes(a["input"]) // p
    if op == "broadcast":  # a pipelined chain from the root: all but the last rank forward it
        t = a["tensor"]
        return t, 0 if p == 1 or rank == (root("src") - 1) % p else _nbytes(t)
    if op == "reduce":  # the chain the other way: all but the root send
        t = a["tensor"]
        return t, 0 if rank == root("dst") else _nbytes(t)
    if op == "gather":
        t = a["tensor"]
        return t, 0 if rank == root("dst") else _nbytes(t)
    if op == "scatter":
        chunks = a.get("scatter_list") or []
        mine = chunks[rank] if rank < len(chunks) else None
        return a["tensor"], _nbytes(chunks) - _nbytes(mine) if rank == root("src") else 0
    if op == "all_to_all":
        ins = a["input_tensor_list"]
        return ins, _nbytes(ins) - _nbytes(ins[rank] if rank < len(ins) else None)
    if op == "all_to_all_single":
        return a["input"], (p - 1) * _nbytes(a["input"]) // p
    return None, 0


class CommCounter:
    """Count what every torch.distributed call in a block sends from this rank, by label.

    Use inside a rank::

        with CommCounter() as comm:
            with comm.label("mlp"):
                out = mlp(x)

    ``comm.records`` holds one dict per call: ``op``, ``label``, ``numel`` and ``bytes`` (the
    tensor handed to the call; for gathers the local input, for reduce-scatters the full
    input), and ``sent_bytes``, what this rank sends when the collective runs as the
    bandwidth-optimal ring (all-reduce ``2(p-1)/p·n``, all-gather ``(p-1)·n_in``,
    reduce-scatter ``(p-1)/p·n_in``, a pipelined chain for broadcast and reduce) or the
    message itself for a send. Calls are counted through the ``torch.distributed`` module,
    so code must call ``dist.all_reduce(...)``, not a name imported before the block.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._labels: list[str] = []
        self._saved: list[tuple[str, Any]] = []

    def __enter__(self) -> CommCounter:
        _p2p_ops_accept_wrappers()
        for name in COUNTED_CALLS:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved.append((name, original))
                setattr(dist, name, self._counting(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in reversed(self._saved):
            setattr(dist, name, original)
        self._saved.clear()

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Tag the calls made inside the block with ``name`` (nested labels join with '/')."""
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

    def _counting(self, op: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                p = dist.get_world_size(group)
                rank = dist.get_rank(group)
                tensors, sent = _ring_cost(op, bound, rank, p)
                self.records.append(
                    {
                        "op": op,
                        "label": "/".join(self._labels),
                        "numel": _numel(tensors),
                        "bytes": _nbytes(tensors),
                        "sent_bytes": int(sent),
                    }
                )
            except (TypeError, KeyError, ValueError, RuntimeError):
                pass  # a call torch itself will reject: let torch say why
            return original(*args, **kwargs)

        counted._course_traced = True  # a recording wrapper: P2POp and _untraced see through it
        return counted

    def total(self, label: str | None = None, op: str | None = None) -> int:
        """Bytes sent by this rank, over the calls with this label (and prefix) and op."""
        return sum(
            r["sent_bytes"]
            for r in self.records
            if (label is None or r["label"] == label or r["label"].startswith(f"{label}/"))
            and (op is None or r["op"] == op)
        )

    def by_label(self) -> dict[str, int]:
        """Bytes sent by this rank per label, in the order the labels first appeared."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r["label"]] = out.get(r["label"], 0) + r["sent_bytes"]
        return out

    def by_op(self) -> dict[str, int]:
        """Bytes sent by this rank per operation."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r["op"]] = out.get(r["op"], 0) + r["sent_bytes"]
        return out
