"""GPU-only cells: skip with a reason on CPU, record figures on a GPU, and refresh the GPU table.

A chapter's GPU-only cell reads::

    if cu.gpu.available(min_devices=2):
        ...  # time it on CUDA
        cu.gpu.record("14_data_parallel", "NCCL all-reduce bus bandwidth, 256 MiB", gbps, "GB/s")

On a machine without CUDA the cell prints one line saying why it was skipped. ``course gpu``
(``python -m course_utils.gpu``) runs every solution notebook that has such a cell, collects
what the cells recorded, and writes the dated table ``.ci/gpu.md`` with the device's name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Environment variable naming the JSON-lines file that ``record`` appends to.
RESULTS_ENV = "COURSE_GPU_RESULTS"
ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / ".ci" / "gpu.md"


def skip_reason(min_devices: int = 1) -> str:
    """Why a cell needing ``min_devices`` CUDA devices cannot run here ('' when it can)."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        return f"no CUDA device on this machine (torch {torch.__version__}, {build})"
    count = torch.cuda.device_count()
    if count < min_devices:
        return f"needs {min_devices} CUDA devices, this machine has {count}"
    return ""


def available(min_devices: int = 1) -> bool:
    """True when ``min_devices`` CUDA devices are here; otherwise print why the cell is skipped."""
    reason = skip_reason(min_devices)
    if reason:
        print(f"GPU cell skipped: {reason}.")
    return not reason


def device_name() -> str:
    """The first CUDA device's name and count, or 'no CUDA device'."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    count = torch.cuda.device_count()
    return f"{count} x {torch.cuda.get_device_name(0)}"


def record(chapter: str, name: str, value: float, unit: str, note: str = "") -> None:
    """Print one GPU figure and, under ``course gpu``, store it for the dated table."""
    print(f"{name}: {value:.4g} {unit}" + (f" ({note})" if note else ""))
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    row = {
        "chapter": str(chapter),
        "name": str(name),
        "value": float(value),
        "unit": str(unit),
        "note": str(note),
        "device": device_name(),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def gpu_notebooks(solutions: Path | None = None) -> list[Path]:
    """Solution notebooks with at least one cell that uses ``cu.gpu``."""
    import nbformat

    found = []
    for path in sorted((solutions or ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any(c.cell_type == "code" and "cu.gpu." in c.source for c in nb.cells):
            found.append(path)
    return found


def run_notebooks(paths: list[Path], timeout: int = 600) -> tuple[list[dict[str, Any]], list[str]]:
    """Execute ``paths`` with recording on; (the recorded rows, one line per notebook that failed)."""
    from .bench import time_notebook

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="course_gpu_") as tmp:
        results = Path(tmp) / "rows.jsonl"
        saved = os.environ.get(RESULTS_ENV)
        os.environ[RESULTS_ENV] = str(results)
        try:
            for path in paths:
                start = time.perf_counter()
                try:
                    time_notebook(path, strict=True, timeout=timeout)
                except Exception as err:  # noqa: BLE001 - one failed notebook, one line
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    failures.append(f"{path.name}: {type(err).__name__}: {first}")
                print(f"{path.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        finally:
            if saved is None:
                os.environ.pop(RESULTS_ENV, None)
            else:
                os.environ[RESULTS_ENV] = saved
        if results.exists():
            rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    return rows, failures


def write_table(rows: list[dict[str, Any]], failures: list[str], out: Path = TABLE) -> None:
    """Write the dated markdown table of GPU figures."""
    import torch

    today = datetime.date.today().isoformat()
    lines = [
        "# GPU figures",
        "",
        f"Measured {today} on {device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda}).",
        "Refresh with `course gpu` on a machine with a GPU; CPU machines skip these cells.",
        "",
        "| chapter | figure | value | unit | note |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chapter']} | {r['name']} | {r['value']:.4g} | {r['unit']} | {r['note']} |"
        )
    if failures:
        lines += ["", "Notebooks that failed:", ""] + [f"- {f}" for f in failures]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``course gpu``: run every GPU cell of the course and write the dated table."""
    parser = argparse.ArgumentParser(prog="course gpu", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=TABLE, help="default: .ci/gpu.md")
    parser.add_argument("--only", nargs="*", metavar="NN", help="only these chapters (numbers)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"course gpu: {reason}; run it on a machine with a GPU.", file=sys.stderr)
        return 1
    paths = gpu_notebooks()
    if args.only:
        wanted = {n.zfill(2) for n in args.only}
        paths = [p for p in paths if p.name[:2] in wanted]
    rows, failures = run_notebooks(paths, args.timeout)
    write_table(rows, failures, args.out)
    print(f"wrote {args.out} ({len(rows)} figures from {len(paths)} notebooks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
