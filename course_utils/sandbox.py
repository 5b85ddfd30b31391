"""Run one learner's code with only what the OS lets us take away: bubblewrap, a uid of its own, rlimits.

Isolation levels, best first; ``isolation_available()`` tries them once and says which one works:

``"bwrap"``
    bubblewrap builds a new root that holds only what a Python kernel needs, read-only: /usr
    and the /bin, /lib links, a few files of /etc, the Python installation with its
    site-packages, and the ``course_utils`` package alone (not the repository, which holds the
    solutions). Writable: the notebook's private working folder, the kernel's private runtime
    folder (its ipc sockets) and size-capped tmpfs at /tmp (also HOME) and /dev/shm. The
    connection file sits read-only beside it, in a folder the sandbox cannot write. New pid, network, ipc, uts and cgroup namespaces: no network (not even the
    grader's loopback), no other process in sight, and when the sandbox's first process dies
    every process inside dies with it, new sessions and double forks included.
    As root, bwrap sets the sandbox up and ``setpriv`` drops to an unprivileged uid of its own
    (61000 + slot, one per live sandbox, no /etc/passwd entry needed) with no capabilities and
    no_new_privs; a second, unprivileged bwrap then forbids new user namespaces. RLIMIT_NPROC
    therefore bounds this sandbox alone, and nothing inside may signal or ptrace anything
    outside. As another user, one unprivileged bwrap does it all in a user namespace: the code
    keeps that user's uid, so RLIMIT_NPROC also counts the user's other processes on the machine
    and must stay above them.
``"rlimits"``
    No usable bubblewrap: rlimits only, and as root the uid of its own. The code sees the real
    filesystem (what that uid may read: keep submissions and outputs in folders only root can
    enter), the network and the process list; cleanup kills every process of that uid. Not
    root: the code runs as the grader's user, and cleanup kills only its process group, so a
    process that calls setsid() can outlive grading.
``"none"``
    No prlimit: the code runs as the grader, unconfined. For trusted notebooks only.

Every level caps each process with prlimit (soft and hard alike, so nothing inside can raise
them): address space, CPU seconds, processes, file size, open files, no core dumps. Memory is
capped per process, not per sandbox; ``processes * memory_bytes`` bounds the total.

Use it as a context manager; leaving the block ends every process started inside::

    with Sandbox(workdir, forbidden=[submissions, out_dir]) as box:
        if box.warning():
            print(box.warning(), file=sys.stderr)
        km = box.kernel_manager()  # AsyncKernelManager: ipc transport, kernel inside the sandbox
        NotebookClient(nb, km=km, resources={"metadata": {"path": str(workdir)}}).execute()

This file is also the launcher that ``wrap`` puts in front of a command: it runs outside the
sandbox with the grader's rights, records the pid, hands the connection file to the
sandbox's uid, then executes prlimit / bwrap / setpriv. It needs the standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 2**30
LEVELS = ("bwrap", "rlimits", "none")
#: First uid handed to sandboxes when the grader runs as root; slot n gets BASE_UID + n.
BASE_UID = 61000
SLOTS = 1000
KERNEL_NAME = "course-sandbox"
#: Where the package is bound inside, so that only ``course_utils`` (not its repository) is seen.
PACKAGE_MOUNT = Path("/opt/course-utils")
_PACKAGE = Path(__file__).resolve().parent
# What of /etc a Python kernel reads: the loader cache, time zone, fonts, certificates, and the
# alternatives that some /usr/bin links point through. Not the real passwd, shadow or the rest:
# a made-up passwd names the sandbox's uid.
_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "fonts",
    "alternatives",
    "ssl",
    "ca-certificates",
    "mime.types",
)
# bwrap as root keeps these for setpriv alone, which drops them with the uid.
_SETUP_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")


@dataclass(frozen=True)
class Limits:
    """Per-process rlimits inside the sandbox, and the size of its private tmpfs."""

    memory_bytes: int = 8 * GiB
    """RLIMIT_AS of each process: a larger allocation fails with MemoryError (torch: RuntimeError)."""
    cpu_seconds: int = 1800
    """RLIMIT_CPU of each process, all its threads together: a backstop behind the grader's wall-clock timeout."""
    processes: int = 512
    """RLIMIT_NPROC of the sandbox's uid; threads count too, and torch starts one per core."""
    file_bytes: int = GiB
    """RLIMIT_FSIZE: the largest file a process may write."""
    open_files: int = 4096
    """RLIMIT_NOFILE: open file descriptors per process."""
    tmp_bytes: int = GiB
    """Size of /tmp (also HOME) and of /dev/shm, each: tmpfs pages are RAM that RLIMIT_AS does not count."""


def is_safe(path: Path | str, forbidden: Iterable[Path | str]) -> bool:
    """True when ``path`` neither contains nor lies inside any forbidden path (symlinks resolved)."""
    real = Path(os.path.realpath(path))
    for bad in forbidden:
        bad = Path(os.path.realpath(bad))
        if real == bad or real in bad.parents or bad in real.parents:
            return False
    return True


def python_paths(forbidden: Iterable[Path | str] = ()) -> tuple[list[Path], list[Path]]:
    """The Python installation to bind: (required prefixes, safe extra sys.path and site folders)."""
    forbidden = list(forbidden)
    exe = Path(sys.executable)
    required = _unique(
        Path(p)
        for p in (
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            sys.base_exec_prefix,
            exe.parent,
            Path(os.path.realpath(exe)).parent,
        )
    )
    for path in required:
        if not is_safe(path, forbidden):
            raise ValueError(
                f"the Python installation {path} contains or lies in a folder the sandbox must "
                "not show; install Python elsewhere or grade from another folder"
            )
    candidates = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    extra = []
    for entry in candidates:
        # "" and relative entries mean the current folder: the grader's, not the kernel's.
        if not entry or not os.path.isabs(entry) or not os.path.exists(entry):
            continue
        path = Path(os.path.normpath(entry))
        if is_safe(path, forbidden) and not any(_inside(path, r) for r in required):
            extra.append(path)
    return required, _unique(extra)


def default_forbidden() -> list[Path]:
    """What no sandbox may show: the repository around the package (solutions, tests), not a Python inside it."""
    repo = _PACKAGE.parent
    if not (repo / "pyproject.toml").exists():
        return []  # an installed package: its parent is site-packages, with nothing to hide
    pythons = [Path(os.path.realpath(p)) for p in (sys.prefix, sys.base_prefix, sys.executable)]
    # Every entry of the checkout but a virtual environment in it; the package is bound alone.
    return [e for e in sorted(repo.iterdir()) if not any(_inside(p, e) for p in pythons)]


@functools.cache
def isolation_available() -> tuple[str, str]:
    """The best isolation level that works here, and why, found by trying it once."""
    if not sys.platform.startswith("linux"):
        return "none", f"sandboxing needs Linux, this is {sys.platform}"
    if not shutil.which("prlimit"):
        return "none", "prlimit (util-linux) is not installed"
    if os.getuid() == 0 and not shutil.which("setpriv"):
        return "none", "setpriv (util-linux) is not installed, so the uid cannot be dropped"
    bwrap = _probe("bwrap")
    if bwrap is None:
        return "bwrap", "bubblewrap works: private filesystem, pid, network and ipc namespaces"
    rlimits = _probe("rlimits")
    if rlimits is None:
        return "rlimits", f"bubblewrap is not usable ({bwrap}); rlimits and a uid of its own only"
    return "none", f"bubblewrap is not usable ({bwrap}) and rlimits fail ({rlimits})"


def _probe(level: str) -> str | None:
    # Build the very command a sandbox would, around an empty Python, so any option this bwrap
    # or kernel lacks shows up now and not in the middle of grading.
    with tempfile.TemporaryDirectory(prefix="course-sandbox-probe-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        try:
            box = Sandbox(work, level=level)
        except (OSError, ValueError) as err:
            return str(err)
        try:
            proc = subprocess.run(
                # Another uid may fail to reach our prefix and fall back on a system one.
                box.wrap(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        "-c",
                        f"import sys; sys.exit(sys.base_prefix != {sys.base_prefix!r})",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return str(err)
        finally:
            box.close()
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return lines[-1] if lines else f"{sys.executable} does not run there as itself"
        return None


class Sandbox:
    """One learner's sandbox: a private working folder, a private kernel runtime folder, rlimits.

    ``workdir`` is the private copy of this one notebook, writable inside at the same path;
    make the sandbox after copying files into it (as root they are handed to the sandbox's uid).
    ``readonly`` folders are shown read-only at the same path. ``forbidden`` folders (the
    submissions, the output folder) are never shown: no bound path may contain or lie in one,
    and ``default_forbidden()`` is always added. ``uid`` overrides the automatic one (root only).
    ``env`` adds variables inside; nothing else of the grader's environment goes in.
    ``level`` asks for a lower level than ``isolation_available()`` (to compare, or to test).
    After construction: ``level`` (the one in force), ``uid`` (of the code inside, as the
    grader sees it), ``own_uid`` (whether that uid is this sandbox's alone), ``runtime_dir``.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        readonly: Sequence[Path | str] = (),
        forbidden: Sequence[Path | str] = (),
        limits: Limits | None = None,
        uid: int | None = None,
        share_net: bool = False,
        env: Mapping[str, str] | None = None,
        level: str | None = None,
    ) -> None:
        self.workdir = Path(os.path.realpath(workdir))
        self.limits = limits or Limits()
        self.share_net = share_net
        self._closed = False
        self._slot_lock: int | None = None
        self.uid, self.gid, self.own_uid = os.getuid(), os.getgid(), False
        if level is None:
            level, self._reason = isolation_available()
        elif level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
        else:
            self._reason = "asked for by the caller"
        self.level = level
        if not self.workdir.is_dir():
            raise ValueError(f"{self.workdir}: the working folder must exist")
        self.root = os.getuid() == 0
        if uid is not None and not self.root:
            raise ValueError("only root can run a sandbox under another uid")
        # The state folder holds the launcher's instructions and pid list (never shown inside),
        # the kernel's connection folder (read-only inside: the grader writes there as root, so
        # the sandbox must not be able to plant a symlink in it) and its runtime folder for the
        # ipc sockets (writable inside), both at the same paths inside as outside.
        self.state = Path(os.path.realpath(tempfile.mkdtemp(prefix="course-sandbox-")))
        self.connection_dir = self.state / "connection"
        self.runtime_dir = self.state / "runtime"
        self.forbidden = [*map(Path, forbidden), *default_forbidden(), self.state]
        try:
            self._setup(uid, readonly, env or {})
        except BaseException:
            self.close()
            raise

    def _setup(
        self, uid: int | None, readonly: Sequence[Path | str], env: Mapping[str, str]
    ) -> None:
        if not is_safe(self.workdir, self.forbidden):
            raise ValueError(
                f"{self.workdir}: the working folder contains or lies in a forbidden folder"
            )
        if self.root and self.level != "none":
            self.uid = self.gid = uid if uid is not None else self._take_slot()
            self.own_uid = True
        if self.own_uid:
            # A slot's uid may hold what a crashed grader left behind.
            _kill_uid(self.uid, self.gid)
        self.runtime_dir.mkdir(mode=0o700)
        self.connection_dir.mkdir(mode=0o711)
        home = self.state / "home"
        home.mkdir(mode=0o700)
        if self.own_uid:
            # rlimits level: the uid reaches its folders through the state folder, unlisted.
            self.state.chmod(0o711)
            for path in (self.runtime_dir, home):
                os.chown(path, self.uid, self.gid)
            _chown_tree(self.workdir, self.uid, self.gid)
        for path in readonly:
            if not is_safe(path, [*self.forbidden, self.workdir]):
                raise ValueError(f"{path}: contains or lies in a folder the sandbox must not show")
        self.readonly = [Path(os.path.abspath(p)) for p in readonly]
        self._python = python_paths([*self.forbidden, self.workdir])
        inside = self._env(env, home)
        if self.level == "bwrap":
            prefix, launch_env = self._bwrap_prefix(inside), {"PATH": "/usr/bin:/bin"}
        elif self.level == "rlimits":
            prefix, launch_env = [*self._prlimit(), *self._setpriv()], inside
        else:
            prefix, launch_env = [], inside
        spec = {
            "prefix": prefix,
            "env": launch_env,
            "cwd": str(self.workdir),
            "connection": str(self.connection_dir),
            "uid": self.uid if self.own_uid else None,
            "gid": self.gid,
            "pids": str(self.state / "pids"),
        }
        (self.state / "launch.json").write_text(json.dumps(spec), encoding="utf-8")

    # ----------------------------------------------------------------------------- the command

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command that runs ``argv`` inside this sandbox (its files, uid and limits)."""
        if self._closed:
            raise RuntimeError("this sandbox is closed")
        # -I: the launcher runs with the grader's rights, so no PYTHON* variable or user site may steer it.
        return [
            sys.executable,
            "-I",
            "-S",
            str(Path(__file__).resolve()),
            str(self.state),
            "--",
            *argv,
        ]

    def warning(self) -> str | None:
        """A one-line warning to print when this sandbox does not fully isolate the learner, else None."""
        install = "install bubblewrap (apt-get install bubblewrap) for real isolation"
        if self.level == "bwrap":
            return None
        if self.level == "rlimits" and self.own_uid:
            return (
                f"WARNING: learner code is NOT fully isolated ({self._reason}): it runs as uid "
                f"{self.uid} under rlimits but sees the filesystem, the network and all processes; {install}."
            )
        if self.level == "rlimits":
            return (
                f"WARNING: learner code is NOT isolated ({self._reason}): it runs as the grader's "
                f"user under rlimits, sees everything the grader sees, and a process that calls "
                f"setsid() can outlive grading; {install}."
            )
        return (
            f"WARNING: learner code is NOT sandboxed at all ({self._reason}): it runs with the "
            f"grader's rights and no limits; {install}."
        )

    def _env(self, extra: Mapping[str, str], home: Path) -> dict[str, str]:
        isolated = self.level == "bwrap"
        home_inside = "/tmp" if isolated else str(home)
        if isolated:
            package_parent = str(PACKAGE_MOUNT)
        else:
            # A folder holding only a link to the package keeps the repository off sys.path.
            link_dir = self.state / "package"
            link_dir.mkdir()
            (link_dir / "course_utils").symlink_to(_PACKAGE)
            package_parent = str(link_dir)
        _, extra_paths = self._python
        return {
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]
            ),
            "HOME": home_inside,
            "TMPDIR": home_inside,
            "USER": "learner",
            "LOGNAME": "learner",
            "LANG": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join([package_parent, *map(str, extra_paths)]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "Agg",
            # glibc reserves 64 MiB of address space per thread arena; with a thread per core
            # that alone can reach RLIMIT_AS on a large machine.
            "MALLOC_ARENA_MAX": "2",
            **extra,
        }

    def _prlimit(self) -> list[str]:
        lim = self.limits
        return [
            _which("prlimit"),
            f"--as={lim.memory_bytes}",
            f"--cpu={lim.cpu_seconds}",
            f"--nproc={lim.processes}",
            f"--fsize={lim.file_bytes}",
            f"--nofile={lim.open_files}",
            "--core=0",
            "--",
        ]

    def _setpriv(self) -> list[str]:
        if not self.own_uid:
            return []
        return [
            _which("setpriv"),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]

    def _bwrap_prefix(self, env: Mapping[str, str]) -> list[str]:
        bwrap = _which("bwrap")
        if self.root:
            # bwrap itself needs root to mount, and root's uid must not run learner code: no user
            # namespace here; setpriv below drops to the sandbox's uid and every capability.
            spaces = ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
            spaces += [] if self.share_net else ["--unshare-net"]
            spaces += [arg for cap in _SETUP_CAPS for arg in ("--cap-add", cap)]
        else:
            spaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
            spaces += ["--share-net"] if self.share_net else []
        cmd = [
            *self._prlimit(),
            bwrap,
            *spaces,
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
            "--clearenv",
            *[arg for key, value in env.items() for arg in ("--setenv", key, value)],
            "--chdir",
            str(self.workdir),
            *self._mounts(),
            "--",
        ]
        if self.root:
            # The second bwrap runs as the sandbox's uid: its user namespace only serves to
            # forbid further ones, which kernel exploits like to start from.
            cmd += self._setpriv()
            cmd += [bwrap, "--unshare-user", "--disable-userns", "--die-with-parent"]
            cmd += ["--dev-bind", "/", "/", "--chdir", str(self.workdir), "--"]
        return cmd

    def _mounts(self) -> list[str]:
        mounts = _Mounts()
        mounts.ro("/usr")
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            top = Path("/") / name
            if top.is_symlink():
                mounts.add("--symlink", os.readlink(top), str(top))
            elif top.is_dir():
                mounts.ro(top)
        for name in _ETC:
            if (Path("/etc") / name).exists():
                mounts.ro(Path("/etc") / name)
        for name, text in self._identity().items():
            (self.state / name).write_text(text, encoding="utf-8")
            mounts.ro(self.state / name, Path("/etc") / name)
        mounts.add("--proc", "/proc")
        mounts.add("--dev", "/dev")
        size = str(self.limits.tmp_bytes)
        mounts.tmpfs("/dev/shm", size)
        mounts.tmpfs("/tmp", size)
        required, extra = self._python
        for path in [*required, *extra]:
            mounts.ro(path)
        mounts.ro(_PACKAGE, PACKAGE_MOUNT / "course_utils")
        for path in self.readonly:
            mounts.ro(path)
        mounts.rw(self.workdir)
        mounts.ro(self.connection_dir)
        mounts.rw(self.runtime_dir)
        # The bare root is a tmpfs too: a read-only one cannot be filled up.
        mounts.add("--remount-ro", "/")
        return mounts.args

    def _identity(self) -> dict[str, str]:
        # Some libraries look the uid up (getpass, ~ expansion); the real passwd stays hidden.
        return {
            "passwd": f"root:x:0:0::/root:/usr/sbin/nologin\nlearner:x:{self.uid}:{self.gid}::/tmp:/bin/sh\n",
            "group": f"root:x:0:\nlearner:x:{self.gid}:\n",
        }

    # ----------------------------------------------------------------------------- the kernel

    def kernel_spec_dir(self) -> Path:
        """Write a kernelspec named ``KERNEL_NAME`` whose kernel runs in this sandbox; return its kernels folder."""
        kernels = self.state / "kernels"
        spec_dir = kernels / KERNEL_NAME
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            # parent_handle=1: no parent to poll (bwrap dies with the grader, and inside a pid
            # namespace ipykernel would mistake bwrap's init for an orphaning) and no banner.
            "argv": self.wrap(
                [
                    sys.executable,
                    "-m",
                    "ipykernel_launcher",
                    "--IPKernelApp.parent_handle=1",
                    "-f",
                    "{connection_file}",
                ]
            ),
            "display_name": "Python 3 (sandboxed)",
            "language": "python",
            # A signal would reach bwrap, not the kernel; ipykernel interrupts itself on request.
            "interrupt_mode": "message",
            "metadata": {"debugger": False},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        return kernels

    def kernel_manager(self, manager_class: type | None = None, **kwargs: Any) -> Any:
        """A jupyter_client kernel manager (AsyncKernelManager by default) that starts its kernel in this sandbox."""
        from jupyter_client import AsyncKernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        cls = manager_class or AsyncKernelManager
        specs = KernelSpecManager(kernel_dirs=[str(self.kernel_spec_dir())])
        return cls(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=specs,
            transport="ipc",
            ip=str(self.runtime_dir / "kernel"),
            connection_file=str(self.connection_dir / "kernel.json"),
            **kwargs,
        )

    # ----------------------------------------------------------------------------- the end

    def cleanup(self) -> None:
        """End every process started in this sandbox, new sessions and double forks included; wait until they are gone."""
        launched = _launched(self.state / "pids")
        namespaces: set[str] = set()
        if self.level == "bwrap":
            namespaces = {_pidns_of_children(pid) or "" for pid, _ in launched}
            namespaces -= {"", os.readlink("/proc/self/ns/pid")}
        for pid, start in launched:
            if _start_time(pid) != start:
                continue  # gone, and its pid may already belong to someone else
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.level != "bwrap" and os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                # bwrap's first process: with it go the pid namespace and everything inside.
                os.kill(pid, signal.SIGKILL)
        if self.own_uid:
            _kill_uid(self.uid, self.gid)
        _wait_gone(lambda: _pidns_members(namespaces))

    def close(self) -> None:
        """Clean up, remove the runtime and state folders, and free the uid for another sandbox."""
        if self._closed:
            return
        self._closed = True
        try:
            self.cleanup()
        finally:
            shutil.rmtree(self.state, ignore_errors=True)
            if self._slot_lock is not None:
                os.close(self._slot_lock)
                self._slot_lock = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_slot(self) -> int:
        # One uid per live sandbox, across threads and processes: the slot is a held flock.
        # Fixed, not under TMPDIR: two graders with different TMPDIRs must still see each other.
        slots = Path("/run/course-sandbox")
        slots.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(slots)
        if info.st_uid != os.getuid() or not os.path.isdir(slots) or os.path.islink(slots):
            raise OSError(f"{slots} is not a folder of the grader's own")
        for n in range(SLOTS):
            uid = BASE_UID + n
            if _has_account(uid):
                continue  # a real account: never borrow (and kill) it
            fd = os.open(slots / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._slot_lock = fd
            return uid
        raise OSError(f"all {SLOTS} sandbox uids from {BASE_UID} are in use")


class _Mounts:
    """bwrap's mount options in order, with the folders above each mount point created 0755."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._ro: list[Path] = []
        self._made: set[Path] = {Path("/")}

    def add(self, *args: str) -> None:
        self.args += args

    def ro(self, src: Path | str, dest: Path | str | None = None) -> None:
        src = Path(src)
        for target in _unique(
            [Path(dest or src), *([] if dest else [Path(os.path.realpath(src))])]
        ):
            if any(_inside(target, r) for r in self._ro):
                continue  # already seen through a larger read-only mount
            self._parents(target)
            self.args += ["--ro-bind", str(src), str(target)]
            self._ro.append(target)

    def rw(self, path: Path) -> None:
        self._parents(path)
        self.args += ["--bind", str(path), str(path)]

    def tmpfs(self, dest: str, size: str) -> None:
        self.args += ["--perms", "1777", "--size", size, "--tmpfs", dest]
        self._made.add(Path(dest))

    def _parents(self, target: Path) -> None:
        # bwrap makes missing parents 0700, which an unprivileged uid cannot cross.
        for parent in reversed(target.parents):
            if parent in self._made or any(_inside(parent, r) for r in self._ro):
                continue
            self.args += ["--perms", "0755", "--dir", str(parent)]
            self._made.add(parent)


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _unique(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _which(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if not found:
        raise OSError(f"{name} is not installed")
    return found


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------------- processes


def _start_time(pid: int) -> int | None:
    # Field 22 of /proc/PID/stat: with the pid it names one process for good, whatever reuses the pid.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _launched(pid_file: Path) -> list[tuple[int, int | None]]:
    try:
        lines = pid_file.read_text().split("\n")
    except OSError:
        return []
    pairs = [line.split() for line in lines if line.strip()]
    return [(int(p), None if s == "-" else int(s)) for p, s in pairs]


def _pidns_of_children(pid: int) -> str | None:
    # bwrap's child is the first process of the new pid namespace; the namespace outlives any
    # process we know of only while its members live, so remember it to wait for them.
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return os.readlink(f"/proc/{children[0]}/ns/pid") if children else None
    except OSError:
        return None


def _processes() -> Iterable[tuple[int, dict[str, str]]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        yield int(entry.name), fields


def uid_processes(uid: int) -> list[int]:
    """The live (not zombie) processes whose real uid is ``uid``."""
    return [
        pid
        for pid, fields in _processes()
        if int(fields.get("Uid", "-1").split()[0]) == uid
        and not fields.get("State", "").startswith("Z")
    ]


def _pidns_members(namespaces: set[str]) -> list[int]:
    found = []
    for entry in os.scandir("/proc") if namespaces else ():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and os.readlink(f"{entry.path}/ns/pid") in namespaces:
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


def _kill_uid(uid: int, gid: int) -> None:
    # kill(-1) from the uid itself reaches all of its processes at once, and the kernel lets no
    # fork slip through meanwhile: racing a fork bomb pid by pid could lose. The shell's builtin
    # does it (procps' kill misreads -1); any uid may run /bin/sh, not always our Python.
    setpriv = [_which("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    for _ in range(5):
        subprocess.run([*setpriv, "/bin/sh", "-c", "kill -s KILL -- -1 2>/dev/null"], check=False)
        if _wait_gone(lambda: uid_processes(uid), timeout=2.0, strict=False):
            return
    raise RuntimeError(f"processes of uid {uid} survived SIGKILL: {uid_processes(uid)}")


def _wait_gone(alive: Any, timeout: float = 5.0, strict: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while alive():
        if time.monotonic() > deadline:
            if strict:
                raise RuntimeError(f"sandboxed processes survived SIGKILL: {alive()}")
            return False
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------------------- the launcher


def _launch(argv: list[str]) -> int:
    """Run outside the sandbox with the grader's rights: note the pid, hand over files, exec the sandbox."""
    state, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: sandbox.py STATE_DIR -- COMMAND...", file=sys.stderr)
        return 2
    spec = json.loads(Path(state, "launch.json").read_text(encoding="utf-8"))
    if spec["uid"] is not None:
        _hand_over(Path(spec["connection"]), spec["uid"], spec["gid"])
    start = _start_time(os.getpid())
    with open(spec["pids"], "a", encoding="utf-8") as pids:
        pids.write(f"{os.getpid()} {'-' if start is None else start}\n")
    os.chdir(spec["cwd"])
    # A group of its own, so cleanup can kill the group without hitting whoever started us.
    with contextlib.suppress(OSError):
        os.setsid()
    os.execvpe(
        spec["prefix"][0] if spec["prefix"] else cmd[0], [*spec["prefix"], *cmd], spec["env"]
    )


def _hand_over(folder: Path, uid: int, gid: int) -> None:
    # The grader writes the kernel's connection file (0600, the session key) just before the
    # kernel starts, in a folder of this sandbox alone: the kernel's uid must read it.
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            # A hard link would carry some other file away with it.
            if info.st_nlink == 1 and info.st_uid == os.getuid():
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
