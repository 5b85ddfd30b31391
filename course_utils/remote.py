"""Trusted grading: the batteries run here, the learner's code runs in the learner's kernel.

The grader keeps the cases, the comparisons and the verdicts in its own process. For each
call of a learner's function it sends the inputs, with the guards (``agent`` and ``invoke``,
shipped by value), to the kernel; the kernel calls the function and sends back plain data,
which the grader reads with ``torch.load(weights_only=True)`` and judges. Whatever a
notebook does to ``course_utils``, ``json`` or ``print`` inside its kernel can change only
its own outputs.

Class exercises (a module or autograd Function the battery builds and pokes) cannot be
driven call by call; their class is exported from the kernel with cloudpickle and checked
in a fresh process of its own, which the notebook's cells never ran in.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from . import agent, checking, distributed, invoke, invoke_world
from .checking import Opaque

#: Largest answer the grader reads back from a kernel (bytes).
MAX_ANSWER_BYTES = 512 * 2**20


class KernelTimeout(Exception):
    """The kernel did not answer within its time."""


class KernelGone(Exception):
    """The kernel cannot answer any more (it died, or its answer was unreadable)."""


def decode(x: Any) -> Any:
    """Undo ``agent.plain``: opaque markers become ``Opaque``, numpy markers numpy values."""
    if isinstance(x, dict):
        if agent.OPAQUE in x:
            return Opaque(str(x[agent.OPAQUE]))
        if agent.NUMPY in x and torch.is_tensor(x[agent.NUMPY]):
            value = x[agent.NUMPY].numpy()
            return value[()] if x.get("scalar") else value
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(decode(v) for v in x)
    return x


class KernelLink:
    """Requests to the agent in one running kernel, over a private exchange folder."""

    def __init__(
        self,
        client: Any,
        requests: Path,
        answers: Path,
        deadline: float,
        interrupt: Callable[[], None] | None = None,
        call_timeout: float = 60.0,
        prefix: list[str] | None = None,
    ) -> None:
        self.client = client
        self.requests, self.answers = Path(requests), Path(answers)
        # The command prefix that runs a program in the kernel's sandbox (class checks).
        self.prefix = list(prefix or [])
        self.deadline = deadline
        self.interrupt = interrupt
        self.call_timeout = call_timeout
        self.broken = ""
        self._ids = itertools.count()
        # Registered once: cloudpickle then ships these modules' code by value with every request.
        for module in (agent, invoke, invoke_world, distributed):
            cloudpickle.register_pickle_by_value(module)
        self._agent = cloudpickle.dumps(agent.serve)

    def remaining(self) -> float:
        """Seconds left before the grading deadline."""
        return self.deadline - time.monotonic()

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request to the agent and return its decoded answer."""
        if self.broken:
            raise KernelGone(self.broken)
        n = next(self._ids)
        req, out = self.requests / f"req-{n}.pkl", self.answers / f"ans-{n}.pt"
        payload = dict(payload, out=str(out))
        if "blob" in payload:
            payload["blob"] = str(self.answers / payload["blob"])
        # The agent travels with every request, pickled once per link (a few ms) and reused.
        req.write_bytes(self._agent + cloudpickle.dumps(payload))
        req.chmod(0o644)
        code = (
            "(lambda c, f: (lambda serve: serve(globals(), c.load(f)))(c.load(f)))"
            f"(__import__('cloudpickle'), open({str(req)!r}, 'rb'))"
        )
        timeout = min(self.remaining(), self.call_timeout)
        if timeout <= 0:
            raise KernelTimeout("no time was left")
        try:
            reply = self.client.execute_interactive(
                code,
                silent=True,
                store_history=False,
                allow_stdin=False,
                timeout=timeout,
                output_hook=lambda msg: None,
            )
        except TimeoutError:
            self._stop()
            raise KernelTimeout(
                f"it did not return within {timeout:.0f} s (an endless loop?)"
            ) from None
        except Exception as err:  # noqa: BLE001 - a dead kernel or broken channel ends the link
            self.broken = f"the kernel stopped answering ({type(err).__name__})"
            raise KernelGone(self.broken) from None
        finally:
            req.unlink(missing_ok=True)
        content = reply.get("content", {})
        if content.get("status") != "ok" and not out.exists():
            raise KernelGone(
                f"the kernel could not run the grader's request "
                f"({content.get('ename', '?')}: {str(content.get('evalue', ''))[:200]})"
            )
        try:
            answer = torch.load(io.BytesIO(read_private(out, MAX_ANSWER_BYTES)), weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable answer is the learner's doing
            raise KernelGone(f"the kernel's answer could not be read ({err})") from None
        finally:
            out.unlink(missing_ok=True)
        if not isinstance(answer, dict):
            raise KernelGone("the kernel's answer was not a dictionary")
        return decode(answer)

    def _stop(self) -> None:
        if self.interrupt is None:
            self.broken = "an earlier call never returned"
            return
        try:
            self.interrupt()
            # The interrupted cell must finish before the kernel can take the next request.
            self.client.execute_interactive(
                "pass", silent=True, store_history=False, timeout=10, output_hook=lambda m: None
            )
        except Exception:  # noqa: BLE001 - a kernel that ignores interrupts is finished for us
            self.broken = "an earlier call never returned, and the kernel ignored the interrupt"


def read_private(path: Path, limit: int) -> bytes:
    """The bytes of a regular file the sandbox wrote, never through a link, at most ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError("it is not a regular file")
        if info.st_size > limit:
            raise OSError(f"it is larger than {limit // 2**20} MiB")
        return f.read(limit + 1)[:limit]


class RemoteFunction:
    """The learner's function as the battery sees it: calling it asks the kernel."""

    def __init__(self, tester: RemoteTester, name: str, shown: str) -> None:
        self._tester = tester
        self._name = name
        self.__name__ = shown

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outcome = self._tester._invoke(self, None, args, kwargs, None)
        if outcome["kind"] == "ok":
            return outcome["value"]
        raise LearnerError(
            f"{outcome.get('error_type', outcome['kind'])}: {outcome.get('message', '')}"
        )


class LearnerError(Exception):
    """The learner's function raised (or was stopped) when a battery called it directly."""


class RemoteTester(checking.Tester):
    """A Tester whose calls of the learner's function go to the learner's kernel."""

    def __init__(
        self, ex: checking.Exercise, link: KernelLink, name: str, shown: str, seed: int
    ) -> None:
        super().__init__(ex, None, seed)
        self.link = link
        self.fn = RemoteFunction(self, name, shown)

    def _invoke(
        self,
        fn: Any,
        probe: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        watch: Callable[[], Any] | None,
    ) -> dict[str, Any]:
        if not isinstance(fn, RemoteFunction):
            raise checking.CheckFailure(
                "this check needs the learner's object in the grader's process, which trusted "
                "grading never allows (a bug in the course: tell the instructor)"
            )
        return self._ask(
            {
                "op": "call",
                "name": fn._name,
                "probe": probe,
                "args": args,
                "kwargs": kwargs,
                "watch": watch,
            }
        )

    def _invoke_world(
        self,
        world_size: int,
        args_per_rank: list[tuple[Any, ...]],
        kwargs_per_rank: list[dict[str, Any]],
        probe: Callable[..., Any] | None,
        watch: Callable[[], Any] | None,
        timeout: float,
    ) -> dict[str, Any]:
        outcome = self._ask(
            {
                "op": "world",
                "name": self.fn._name,
                "world_size": world_size,
                "probe": probe,
                "args": args_per_rank,
                "kwargs": kwargs_per_rank,
                "watch": watch,
                "timeout": timeout,
            }
        )
        if outcome["kind"] == "ok" and not all(
            isinstance(outcome.get(key), list) and len(outcome[key]) == world_size
            for key in ("values", "args", "kwargs")
        ):
            raise checking.CheckFailure(
                f"{self.fn.__name__} sent back an answer the grader cannot read"
            )
        return outcome

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One request with the exercise's guards; the outcome, or CheckFailure in one line."""
        shown = self.fn.__name__
        # The battery's probes and watches travel by value, like the agent.
        for module in invoke.battery_modules():
            cloudpickle.register_pickle_by_value(module)
        payload = dict(payload, backward=self.exercise.backward, forbidden=self.exercise.forbidden)
        try:
            outcome = self.link.request(payload)
        except KernelTimeout as err:
            raise checking.CheckFailure(f"{shown} was stopped: {err}") from None
        except KernelGone as err:
            raise checking.CheckFailure(f"{shown} could not be called: {err}") from None
        if outcome.get("kind") not in (*invoke.KINDS, "deadlock", "died"):
            raise checking.CheckFailure(f"{shown} sent back an answer the grader cannot read")
        return outcome


def grade_in_kernel(
    link: KernelLink, chapter: str, exercises: list[checking.Exercise], *, seed: int = 0
) -> list[dict[str, Any]]:
    """Check each exercise the kernel's notebook defines, judging here; one row per exercise."""
    from .grade import _first_line, _row, candidate_names

    names = [n for ex in exercises for n in candidate_names(ex)]
    try:
        defined = link.request({"op": "inspect", "names": names})["names"]
    except (KernelTimeout, KernelGone) as err:
        return [
            _row(ex.id, "crashed", f"the kernel could not be inspected: {err}") for ex in exercises
        ]
    fingerprints = checking.reference_fingerprints()
    rows = []
    for ex in exercises:
        start = time.perf_counter()
        name = next((n for n in candidate_names(ex) if n in defined), None)
        if name is None:
            wanted = " or ".join(f"`{n}`" for n in candidate_names(ex))
            rows.append(_row(ex.id, "missing", f"the notebook defines no {wanted}"))
            continue
        info = defined[name]
        status, message = "failed", ""
        if not info.get("callable"):
            message = f"`{name}` is a {info.get('type')}, not a function or class"
        elif info.get("fingerprint") in fingerprints:
            message = (
                f"`{name}` is the course's own reference ({fingerprints[info['fingerprint']]}), "
                "not your code; the check passes only your own implementation."
            )
        else:
            try:
                if ex.signature.lstrip().startswith("class"):
                    passed = _check_class(link, ex, name, seed)
                else:
                    tester = RemoteTester(ex, link, name, info.get("name") or name, seed)
                    passed = len(checking.run_battery(ex, tester, strict=True, seed=seed).rows)
                status, message = "passed", f"{passed} checks passed"
            except checking.CheckFailure as failure:
                pending = "is not implemented yet" in str(failure)
                status = "pending" if pending else "failed"
                message = _first_line(str(failure), ex.id)
            except Exception as err:  # noqa: BLE001 - a battery error is one row, never a crash
                message = f"the check stopped: {type(err).__name__}: {_first_line(str(err))}"
        rows.append(_row(ex.id, status, message, time.perf_counter() - start))
    return rows


def _check_class(link: KernelLink, ex: checking.Exercise, name: str, seed: int) -> int:
    """Export the learner's class and check it in a fresh process; the number of checks it passed."""
    blob = f"class-{ex.id}.pkl"
    try:
        link.request({"op": "export", "name": name, "blob": blob})
    except (KernelTimeout, KernelGone) as err:
        raise checking.CheckFailure(f"`{name}` could not be exported for checking: {err}") from None
    source, result = link.answers / blob, link.answers / f"result-{ex.id}.json"
    if not source.exists():
        raise checking.CheckFailure(f"`{name}` could not be exported for checking")
    cmd = [sys.executable, "-m", "course_utils.remote", str(source), ex.id, str(seed), str(result)]
    timeout = max(1.0, min(link.remaining(), 10 * link.call_timeout))
    try:
        subprocess.run(
            [*link.prefix, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise checking.CheckFailure(
            f"checking `{name}` did not finish within {timeout:.0f} s"
        ) from None
    try:
        data = json.loads(read_private(result, 2**20).decode("utf-8"))
        status, message, rows = str(data["status"]), str(data["message"]), int(data["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        raise checking.CheckFailure(
            f"checking `{name}` in a fresh process gave no result (does the class end the process?)"
        ) from None
    finally:
        source.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
    if status != "passed":
        raise checking.CheckFailure(message)
    return rows


def _class_main(argv: list[str]) -> int:
    """Check one exported class (``python -m course_utils.remote BLOB ID SEED RESULT``)."""
    blob, exercise_id, seed, result = argv
    out: dict[str, Any]
    try:
        cls = cloudpickle.loads(Path(blob).read_bytes())
    except Exception as err:  # noqa: BLE001 - a class that cannot be rebuilt is a failure, in one line
        out = {
            "status": "failed",
            "message": f"the class could not be rebuilt here ({type(err).__name__}: {err})",
            "rows": 0,
        }
    else:
        try:
            report = checking.check(exercise_id, cls, strict=True, seed=int(seed))
            out = {"status": report.status, "message": "", "rows": len(report.rows)}
        except checking.CheckFailure as failure:
            out = {"status": "failed", "message": str(failure), "rows": 0}
        except BaseException as err:  # noqa: BLE001 - whatever the class does, one line
            out = {
                "status": "failed",
                "message": f"the check stopped: {type(err).__name__}: {err}",
                "rows": 0,
            }
    Path(result).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_class_main(sys.argv[1:]))
