"""course_utils.gpu: GPU-only cells skip with a reason on CPU; figures land in a dated table."""

from __future__ import annotations

import datetime
import json

import pytest
import torch

from course_utils import cli, gpu


def test_on_a_machine_without_cuda_a_gpu_cell_says_why_it_skips(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.available() is False
    out = capsys.readouterr().out
    assert out.startswith("GPU cell skipped: no CUDA device") and out.count("\n") == 1


def test_too_few_devices_is_its_own_reason(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu.available(min_devices=2) is False
    assert "needs 2 CUDA devices, this machine has 1" in capsys.readouterr().out
    assert gpu.skip_reason(1) == ""


def test_record_prints_and_appends_under_course_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(gpu.RESULTS_ENV, raising=False)
    gpu.record("14_data_parallel", "bus bandwidth", 123.456, "GB/s")
    assert "bus bandwidth: 123.5 GB/s" in capsys.readouterr().out
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(gpu.RESULTS_ENV, str(rows))
    gpu.record("14_data_parallel", "bus bandwidth", 2.0, "GB/s", note="2 ranks")
    row = json.loads(rows.read_text())
    assert row["value"] == 2.0 and row["note"] == "2 ranks" and row["chapter"] == "14_data_parallel"


def test_the_table_is_dated_and_names_the_device(tmp_path):
    out = tmp_path / "gpu.md"
    rows = [{"chapter": "14", "name": "x", "value": 1.0, "unit": "ms", "note": ""}]
    gpu.write_table(rows, ["15_tensor_parallel.ipynb: CellExecutionError: boom"], out)
    text = out.read_text()
    assert datetime.date.today().isoformat() in text and gpu.device_name() in text
    assert "| 14 | x | 1 | ms |  |" in text and "boom" in text


def test_gpu_notebooks_are_the_ones_with_gpu_cells(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nbformat.write(
        new_notebook(cells=[new_code_cell("cu.gpu.available()")]), tmp_path / "14_a.ipynb"
    )
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), tmp_path / "15_b.ipynb")
    assert [p.name for p in gpu.gpu_notebooks(tmp_path)] == ["14_a.ipynb"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the CPU answer")
def test_course_gpu_on_a_cpu_machine_is_one_line_and_fails(capsys):
    assert cli.main(["gpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("course gpu: no CUDA device") and "\n" not in err
