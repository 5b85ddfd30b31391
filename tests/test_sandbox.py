"""course_utils.sandbox: each attack a learner's notebook has made on the grader, and that it now fails.

The attacks run for real: in a Jupyter kernel (ipc transport) or a process started inside a
sandbox. They need bubblewrap and skip, saying why, where ``isolation_available()`` finds none.
The "rlimits" level is tested where the tests run as root (a uid of its own is its only defence).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from nbformat.v4 import new_code_cell, new_notebook

from course_utils import sandbox
from course_utils.sandbox import Limits, Sandbox

LEVEL, REASON = sandbox.isolation_available()
ROOT = os.getuid() == 0
needs_bwrap = pytest.mark.skipif(LEVEL != "bwrap", reason=f"no bubblewrap sandbox here: {REASON}")
REPO = Path(sandbox.__file__).resolve().parents[1]
# A Python every uid may run: the rlimits level shows the real filesystem, where the grader's
# own interpreter may sit in a folder only root can enter.
SYSTEM_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None
)


class Classroom:
    """Two learners' submissions, the grader's output folder, and a private copy of alice's notebook."""

    def __init__(self, root: Path) -> None:
        self.submissions = root / "submissions"
        self.alice = self.submissions / "alice" / "01_softmax.ipynb"
        self.bob = self.submissions / "bob" / "01_softmax.ipynb"
        self.out = root / "out"
        self.grades = self.out / "grades.csv"
        self.work = root / "work" / "alice"
        for path, text in (
            (self.alice, "alice's work"),
            (self.bob, "bob's work"),
            (self.grades, "student,status\n"),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.work.mkdir(parents=True)
        shutil.copyfile(self.alice, self.work / self.alice.name)
        # What a careful grader does anyway; it is all the rlimits level has to stand on.
        for folder in (self.submissions, self.out):
            folder.chmod(0o700)

    def sandbox(self, **kwargs: Any) -> Sandbox:
        return Sandbox(self.work, forbidden=[self.submissions, self.out], **kwargs)


@pytest.fixture()
def room() -> Iterator[Classroom]:
    # Not under pytest's tmp_path, a folder only root may enter: the rlimits level must be
    # stopped by the classroom's own permissions, not by some folder above it.
    with tempfile.TemporaryDirectory(prefix="test-sandbox-") as tmp:
        Path(tmp).chmod(0o755)
        yield Classroom(Path(tmp))


class Kernel:
    """A sandboxed kernel and a blocking client that runs a cell and returns its outputs."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.km = box.kernel_manager(KernelManager)
        self.km.start_kernel(cwd=str(box.workdir))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> tuple[str, str]:
        """(status, text): the cell's status and its stdout, or its error as ``Name: value``."""
        texts: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                texts.append(content["text"])
            elif msg["msg_type"] == "error":
                texts.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(
            textwrap.dedent(code), timeout=timeout, output_hook=hook
        )
        return reply["content"]["status"], "".join(texts).strip()

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Classroom, Kernel]]:
    """One kernel for the attacks that leave it alive: starting one and importing torch takes seconds."""
    if LEVEL != "bwrap":
        pytest.skip(f"no bubblewrap sandbox here: {REASON}")
    with tempfile.TemporaryDirectory(prefix="test-sandbox-") as tmp:
        room = Classroom(Path(tmp))
        with room.sandbox() as box:
            kernel = Kernel(box)
            try:
                yield room, kernel
            finally:
                kernel.stop()


def marker_processes(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and marker.encode() in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def escape_code(marker: str, grades: Path) -> str:
    """Python that leaves a process behind in a session of its own, which writes files later."""
    script = (
        "exec </dev/null >/dev/null 2>&1; touch started.txt; sleep 1.5; "
        f"echo pwned > {grades}; echo escaped > escaped.txt  # {marker}"
    )
    return f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["sh", "-c", {script!r}])
            os._exit(0)
        os.wait()
        deadline = time.monotonic() + 10
        while not os.path.exists("started.txt") and time.monotonic() < deadline:
            time.sleep(0.01)
        print("forked")
    """


def assert_escapee_never_wrote(room: Classroom) -> None:
    assert (room.work / "started.txt").exists(), (
        "the escapee never started: the test proves nothing"
    )
    time.sleep(2.0)  # past the escapee's sleep: had it lived, it would have written by now
    assert not (room.work / "escaped.txt").exists()
    assert room.grades.read_text() == "student,status\n"


FORK_BOMB = """
import os, time
children = []
try:
    for _ in range(200):  # bounded: even with no limit this stays harmless
        pid = os.fork()
        if pid == 0:
            os.close(1), os.close(2)  # or whoever reads our output waits for the sleepers
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    print("unbounded", len(children))
except BlockingIOError:
    print("stopped after", len(children))
"""


# ---- which paths a sandbox may show: no kernel ----------------------------------------------


def test_is_safe_refuses_ancestors_and_insides_of_forbidden_paths(tmp_path: Path) -> None:
    subs = tmp_path / "course" / "submissions"
    subs.mkdir(parents=True)
    assert not sandbox.is_safe(tmp_path, [subs])  # would show every submission
    assert not sandbox.is_safe(subs, [subs])
    assert not sandbox.is_safe(subs / "alice", [subs])
    assert sandbox.is_safe(tmp_path / "course" / "venv", [subs])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "course")
    assert not sandbox.is_safe(link, [subs])  # symlinks are resolved first


def test_python_paths_drop_sys_path_entries_that_would_show_submissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subs = tmp_path / "submissions"
    (subs / "alice").mkdir(parents=True)
    safe = tmp_path / "libs"
    safe.mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path), str(subs / "alice"), str(safe), ""])
    required, extra = sandbox.python_paths([subs])
    assert Path(sys.base_prefix) in required
    assert safe in extra
    assert tmp_path not in extra and subs / "alice" not in extra


def test_repository_solutions_and_tests_are_never_shown() -> None:
    forbidden = sandbox.default_forbidden()
    assert {REPO / "solutions", REPO / "tests", REPO / "course_utils"} <= set(forbidden)
    _, extra = sandbox.python_paths(forbidden)
    # pytest puts tests/ on sys.path, and the tests run with the repository on PYTHONPATH.
    assert not [p for p in extra if p == REPO or REPO in p.parents]


@needs_bwrap
def test_readonly_paths_that_contain_submissions_are_refused(room: Classroom) -> None:
    with pytest.raises(ValueError, match="must not show"):
        room.sandbox(readonly=[room.submissions.parent])
    with pytest.raises(ValueError, match="forbidden"):
        Sandbox(room.bob.parent, forbidden=[room.submissions])


# ---- attacks in a kernel ---------------------------------------------------------------------


def test_kernel_imports_the_course_stack_and_runs_a_cell(shared: tuple[Classroom, Kernel]) -> None:
    room, kernel = shared
    status, text = kernel.run(
        """
        import torch, numpy, matplotlib, ipywidgets, course_utils
        import matplotlib.pyplot as plt
        plt.plot(numpy.arange(3)); plt.savefig("plot.png")
        import os
        print(course_utils.__file__, torch.ones(2, 3).sum().item(), os.getuid())
        """
    )
    assert status == "ok", text
    path, total, uid = text.split()
    # course_utils comes from its own folder, not from the repository that holds the solutions.
    assert path == f"{sandbox.PACKAGE_MOUNT}/course_utils/__init__.py"
    assert float(total) == 6.0
    assert int(uid) == kernel.box.uid and (int(uid) != 0 or not ROOT)
    assert (room.work / "plot.png").is_file()  # the working folder is writable


def test_overwriting_another_learners_submission_fails(shared: tuple[Classroom, Kernel]) -> None:
    room, kernel = shared
    before = room.bob.read_bytes()
    for target in (room.bob, Path("../../submissions/bob") / room.bob.name):
        status, text = kernel.run(f"open({str(target)!r}, 'w').write('zero marks')")
        assert status == "error" and "FileNotFoundError" in text, text
    assert room.bob.read_bytes() == before


def test_reading_a_classmates_notebook_fails(shared: tuple[Classroom, Kernel]) -> None:
    room, kernel = shared
    status, text = kernel.run(
        f"""
        import os
        print([p for p in ({str(room.bob)!r}, {str(room.submissions)!r}, {str(room.out)!r},
                           {str(REPO)!r}, {str(REPO / "solutions")!r}, "/work", "/home")
               if os.path.exists(p)])
        print(sorted(os.listdir({str(room.work.parent)!r})))
        """
    )
    assert status == "ok", text
    visible, siblings = text.splitlines()
    assert visible == "[]"
    assert siblings == "['alice']"  # only this learner's own copy


def test_allocating_30_gb_fails_inside_and_the_kernel_survives(
    shared: tuple[Classroom, Kernel],
) -> None:
    _, kernel = shared
    status, text = kernel.run("x = bytearray(30 * 2**30)")
    assert status == "error" and text.startswith("MemoryError"), text
    status, text = kernel.run("import torch\nx = torch.empty(30 * 2**30, dtype=torch.uint8)")
    assert status == "error" and "can't allocate memory" in text, text
    assert kernel.run("print(6 * 7)") == ("ok", "42")


def test_no_tcp_connection_to_the_graders_loopback(shared: tuple[Classroom, Kernel]) -> None:
    _, kernel = shared
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        status, text = kernel.run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
        )
    assert status == "error" and ("ConnectionRefusedError" in text or "OSError" in text), text


def test_kernel_sees_no_other_process(shared: tuple[Classroom, Kernel]) -> None:
    _, kernel = shared
    status, text = kernel.run(
        "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))"
    )
    assert status == "ok" and int(text) < 10, text


def test_kernel_cannot_touch_the_graders_side_of_the_sandbox(
    shared: tuple[Classroom, Kernel],
) -> None:
    _, kernel = shared
    state, connection = kernel.box.state, kernel.box.connection_dir
    status, text = kernel.run(
        f"""
        import os
        print(sorted(os.listdir({str(state)!r})))
        try:
            open({str(connection / "planted")!r}, "w")
        except OSError as err:
            print(type(err).__name__)
        """
    )
    # Not the launcher's instructions nor its pid list; the connection folder is read-only.
    assert (status, text.split("\n")) == ("ok", ["['connection', 'runtime']", "OSError"]), text


@needs_bwrap
def test_a_double_forked_setsid_process_dies_with_the_sandbox(room: Classroom) -> None:
    marker = f"escapee-{os.getpid()}-{time.monotonic_ns()}"
    with room.sandbox() as box:
        kernel = Kernel(box)
        assert kernel.run(escape_code(marker, room.grades)) == ("ok", "forked")
        assert marker_processes(marker), "the escapee should be alive while the kernel is"
        kernel.stop()
        box.cleanup()
        assert marker_processes(marker) == []
        if box.own_uid:
            assert sandbox.uid_processes(box.uid) == []
    assert_escapee_never_wrote(room)


@needs_bwrap
def test_a_fork_bomb_stops_at_the_process_limit(room: Classroom) -> None:
    with room.sandbox(limits=Limits(processes=24)) as box:
        proc = subprocess.run(
            box.wrap([sys.executable, "-c", FORK_BOMB]), capture_output=True, text=True, timeout=60
        )
        assert proc.stdout.startswith("stopped after"), proc.stdout + proc.stderr
        assert int(proc.stdout.split()[-1]) < 24
    if box.own_uid:
        assert sandbox.uid_processes(box.uid) == []


@needs_bwrap
def test_notebook_client_runs_a_notebook_in_the_sandbox(room: Classroom) -> None:
    from nbclient import NotebookClient

    nb = new_notebook(
        cells=[new_code_cell("import os\nprint(os.getcwd(), os.path.exists('/work'))")]
    )
    with room.sandbox() as box:
        client = NotebookClient(
            nb,
            km=box.kernel_manager(),
            timeout=60,
            resources={"metadata": {"path": str(room.work)}},
        )
        asyncio.run(client.async_execute())
    assert nb.cells[0].outputs[0]["text"].split() == [str(room.work), "False"]


@needs_bwrap
def test_a_bwrap_sandbox_needs_no_warning(room: Classroom) -> None:
    with room.sandbox() as box:
        assert box.level == "bwrap" and box.warning() is None


@needs_bwrap
def test_cpu_file_and_tmp_limits_stop_a_process(room: Classroom) -> None:
    limits = Limits(cpu_seconds=1, file_bytes=2**20, tmp_bytes=4 * 2**20)
    code = """
        import errno
        # One file past file_bytes, then many files under it that together fill /tmp.
        for paths, size in ((["big.bin"], 2**21), ([f"/tmp/{i}.bin" for i in range(8)], 2**19 + 2**18)):
            try:
                for path in paths:
                    with open(path, "wb") as f:
                        f.write(bytes(size))
            except OSError as err:
                print(errno.errorcode[err.errno], flush=True)
        while True:
            pass
    """
    with room.sandbox(limits=limits) as box:
        # Without RLIMIT_CPU the endless loop would run into the timeout.
        proc = subprocess.run(
            box.wrap([sys.executable, "-I", "-S", "-c", textwrap.dedent(code)]),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.stdout.split() == ["EFBIG", "ENOSPC"], proc.stdout + proc.stderr
    # bwrap reports a child killed by a signal as 128 + the signal.
    killed = {-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL, 128 + signal.SIGXCPU}
    assert proc.returncode in killed


@pytest.mark.skipif(not (ROOT and LEVEL != "none"), reason="only root gives sandboxes uids")
def test_live_sandboxes_get_distinct_uids(room: Classroom) -> None:
    with room.sandbox() as first, room.sandbox() as second:
        assert first.uid != second.uid
        assert min(first.uid, second.uid) >= sandbox.BASE_UID


# ---- the rlimits level: no bubblewrap, a uid of its own ------------------------------------

needs_rlimits = pytest.mark.skipif(
    not (ROOT and SYSTEM_PYTHON and shutil.which("setpriv") and shutil.which("prlimit")),
    reason="the rlimits level is tested as root, with setpriv, prlimit and a system Python",
)


def runs_as_another_uid(python: str) -> bool:
    """Whether an unprivileged uid may run ``python`` (not where it sits in a folder only root enters)."""
    become = [
        "setpriv",
        f"--reuid={sandbox.BASE_UID - 1}",
        f"--regid={sandbox.BASE_UID - 1}",
        "--clear-groups",
    ]
    return (
        subprocess.run(
            [*become, "--", python, "-c", "import ipykernel"], capture_output=True
        ).returncode
        == 0
    )


def run_rlimits(box: Sandbox, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        box.wrap([str(SYSTEM_PYTHON), "-I", "-S", "-c", textwrap.dedent(code)]),
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_rlimits
def test_rlimits_level_warns_loudly(room: Classroom) -> None:
    with room.sandbox(level="rlimits") as box:
        warning = box.warning()
        assert warning and warning.startswith("WARNING") and "network" in warning
        assert box.own_uid and box.uid >= sandbox.BASE_UID


@needs_rlimits
def test_rlimits_level_keeps_other_learners_and_the_output_out_of_reach(room: Classroom) -> None:
    with room.sandbox(level="rlimits") as box:
        proc = run_rlimits(
            box,
            f"""
            for path, mode in (({str(room.bob)!r}, "r"), ({str(room.bob)!r}, "w"), ({str(room.grades)!r}, "w")):
                try:
                    open(path, mode)
                    print("opened", path, mode)
                except PermissionError:
                    print("denied")
            open("mine.txt", "w").write("ok")
            """,
        )
    assert proc.stdout.split() == ["denied"] * 3, proc.stdout + proc.stderr
    assert (room.work / "mine.txt").read_text() == "ok"  # its own working folder is writable
    assert room.bob.read_text() == "bob's work"


@needs_rlimits
def test_rlimits_level_cleanup_kills_a_double_forked_setsid_process(room: Classroom) -> None:
    marker = f"escapee-{os.getpid()}-{time.monotonic_ns()}"
    with room.sandbox(level="rlimits") as box:
        proc = run_rlimits(box, escape_code(marker, room.grades))
        assert proc.stdout.strip() == "forked", proc.stderr
        assert marker_processes(marker), "without a pid namespace the escapee outlives its parent"
        box.cleanup()
        assert marker_processes(marker) == [] and sandbox.uid_processes(box.uid) == []
    assert_escapee_never_wrote(room)


@needs_rlimits
def test_rlimits_level_limits_memory_and_processes(room: Classroom) -> None:
    with room.sandbox(level="rlimits", limits=Limits(processes=24)) as box:
        memory = run_rlimits(
            box,
            """
            try:
                bytearray(30 * 2**30)
            except MemoryError:
                print("MemoryError")
            """,
        )
        assert memory.stdout.strip() == "MemoryError", memory.stderr
        bomb = run_rlimits(box, FORK_BOMB)
        assert bomb.stdout.startswith("stopped after"), bomb.stdout + bomb.stderr


# ---- not root: bubblewrap in a user namespace ----------------------------------------------


@needs_bwrap
@pytest.mark.skipif(not (ROOT and SYSTEM_PYTHON), reason="needs root to become another user")
def test_an_unprivileged_grader_gets_the_same_isolation(room: Classroom) -> None:
    # The grader's own Python may live where other users cannot go; sandbox.py needs only the
    # standard library, so a system Python runs it here as an ordinary user.
    user = sandbox.BASE_UID - 1000
    for path in [room.submissions.parent, *room.submissions.parent.rglob("*")]:
        os.chown(path, user, user)
    marker = f"escapee-{os.getpid()}-{time.monotonic_ns()}"
    probe = f"import os; print(os.getuid(), os.path.exists({str(room.bob)!r}), os.listdir('/proc/1/fd') != [])"
    script = f"""
        import subprocess, sys
        sys.path.insert(0, {str(REPO)!r})
        from course_utils import sandbox
        print(sandbox.isolation_available()[0])
        with sandbox.Sandbox({str(room.work)!r}, forbidden=[{str(room.submissions)!r}]) as box:
            for code in ({probe!r}, {textwrap.dedent(escape_code(marker, room.grades))!r}):
                out = subprocess.run(box.wrap([sys.executable, "-I", "-S", "-c", code]), capture_output=True, text=True)
                print(out.stdout.strip() or out.stderr)
    """
    become = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
    proc = subprocess.run(
        [*become, str(SYSTEM_PYTHON), "-I", "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=room.work,
    )
    # /proc/1 is the sandbox's own first process, which a same-uid kernel may inspect.
    assert proc.stdout.split() == ["bwrap", str(user), "False", "True", "forked"], (
        proc.stdout + proc.stderr
    )
    # The pid namespace ended with the sandbox's first process: nothing to clean up by uid.
    assert marker_processes(marker) == []
    assert_escapee_never_wrote(room)


@needs_rlimits
def test_rlimits_level_runs_a_kernel(room: Classroom) -> None:
    if not runs_as_another_uid(sys.executable):
        pytest.skip(f"{sys.executable} with ipykernel cannot run as an unprivileged uid here")
    with room.sandbox(level="rlimits") as box:
        kernel = Kernel(box)
        try:
            assert kernel.run("import os\nprint(os.getuid())") == ("ok", str(box.uid))
        finally:
            kernel.stop()
