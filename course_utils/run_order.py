"""Order the test run longest first, from the seconds each test file and notebook last took.

With two xdist workers and ``--dist loadscope``, each test module and each notebook goes to
one worker whole. Handing them out longest first (largest-processing-time order) lets the
run end on short items, instead of one worker finishing a long notebook alone while the
other idles. The seconds come from ``.ci/durations.json``, written from a JUnit XML report:

    python3 -m pytest --junitxml=run.xml && python3 -m course_utils.run_order run.xml

Files missing from the table (new ones) run first, in their collected order; without a
table the order is the collected one. Durations only order the run: nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

DURATIONS = Path(".ci") / "durations.json"


def scope_key(nodeid: str) -> str:
    """The name JUnit XML gives the file of a test id: ``tests/test_x.py::t`` -> ``tests.test_x``."""
    path = nodeid.split("::", 1)[0]
    if path.endswith(".py"):
        path = path[: -len(".py")]
    return path.replace("/", ".")


def durations_from_junit(report: Path) -> dict[str, float]:
    """Seconds per test file or notebook (summed over its items) in a JUnit XML report."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError) as err:
        raise ValueError(f"cannot read the JUnit XML report {report}: {err}") from None
    seconds: dict[str, float] = defaultdict(float)
    for case in root.iter("testcase"):
        classname = case.get("classname") or ""
        if classname:
            seconds[classname] += float(case.get("time") or 0.0)
    if not seconds:
        raise ValueError(f"{report} holds no test cases")
    return {key: round(value, 1) for key, value in sorted(seconds.items())}


def load_durations(rootdir: Path) -> dict[str, float]:
    """The recorded seconds per scope key, or {} when there is no readable table."""
    try:
        data = json.loads((rootdir / DURATIONS).read_text())
        return {str(k): float(v) for k, v in data["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_durations(rootdir: Path, seconds: dict[str, float]) -> Path:
    """Write the table with when and on what it was measured; returns its path."""
    path = rootdir / DURATIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "measured": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "note": "seconds per test file / notebook from a JUnit XML report; orders the run only",
        "seconds": seconds,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def order_key(durations: dict[str, float]) -> Callable[[str], tuple[bool, float]]:
    """Sort key for node ids: unknown files first, then the recorded ones longest first."""

    def key(nodeid: str) -> tuple[bool, float]:
        seconds = durations.get(scope_key(nodeid))
        return (seconds is not None, -(seconds or 0.0))

    return key


def main(argv: list[str] | None = None) -> int:
    """Write .ci/durations.json from a JUnit XML report."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.run_order", description=__doc__.splitlines()[0]
    )
    parser.add_argument("report", type=Path, help="JUnit XML written by pytest --junitxml")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root")
    args = parser.parse_args(argv)
    try:
        seconds = durations_from_junit(args.report)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    path = write_durations(args.root, seconds)
    print(f"wrote {path}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
