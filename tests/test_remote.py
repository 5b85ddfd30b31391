"""Trusted grading (course_utils.remote): verdicts a notebook cannot write, references refused.

Each notebook below is graded the way `course grade` grades a class. The forgeries are the
ones an instructor's review found to pass before: each now gets the grade its own code earns.
"""

from __future__ import annotations

from pathlib import Path

import nbfactory
import nbformat
import pytest
import torch
from nbfactory import write

from course_utils import checking, grade, remote

CH01 = "01_logits_softmax_cross_entropy"
IDS01 = [e.id for e in grade.chapter_exercises(CH01)]
IMPORTS = "import torch\nimport torch.nn.functional as F\nimport course_utils as cu"


def notebook(chapter: str, *sources: str) -> nbformat.NotebookNode:
    return nbfactory.notebook(*sources, chapter=chapter)


# Wrong on purpose: every exercise returns its input (or zeros), far from any right answer.
WRONG = """
def softmax(logits, dim=-1):
    return logits
def log_softmax(logits, dim=-1):
    return logits
def cross_entropy(logits, target):
    return logits.sum(), logits
def group_softmax_cross_entropy(logits, target_mask):
    return logits.sum(), logits
def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1):
    return logits
"""

FORGERIES = {
    "patched_grader": """
import course_utils.grade as g
g.grade_namespace = lambda chapter, ns, exercise=None: [
    {"exercise": e.id, "status": "passed", "message": "ok", "seconds": 0.0}
    for e in g.chapter_exercises(chapter)
]
""",
    "patched_check": """
import course_utils.checking as c
def fake(exercise_id, fn, *, strict=None, seed=0):
    return c.Report(exercise_id, "passed")
c.check = fake
cu.check = fake
c.run_battery = lambda ex, tester, **k: c.Report(ex.id, "passed")
""",
    "patched_comparison": """
import course_utils.checking as c, course_utils.gradcheck as gc
c.Tester.compare = lambda self, *a, **k: None
c.Tester.fail = lambda self, *a, **k: None
c.Tester.expect_tensor = lambda self, case, q, got, **k: got
gc.compare = lambda *a, **k: gc.Comparison(True, 0.0, 0.0, None, 0.0, 0.0)
""",
    "patched_json": """
import json, builtins
_rows = [{"exercise": i, "status": "passed", "message": "", "seconds": 0} for i in IDS]
json.dumps = lambda *a, **k: json.JSONEncoder().encode(_rows)
builtins.print = lambda *a, **k: None
""".replace("IDS", repr(IDS01)),
}

REFERENCES = """
import functools, types
from course_utils.checks.ch01_logits_softmax_cross_entropy import ref_log_softmax as log_softmax
softmax = cu.reference("softmax")
def cross_entropy(logits, target):
    return cu.reference("cross_entropy")(logits, target)
group_softmax_cross_entropy = functools.partial(cu.reference("group_softmax_cross_entropy"))
gumbel_softmax = types.FunctionType(cu.reference("gumbel_softmax").__code__, globals())
"""


SHORTCUTS = """
def softmax(logits, dim=-1):
    return torch.softmax(logits, dim)
def log_softmax(logits, dim=-1):
    return F.log_softmax(logits, dim)
def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1):
    return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=dim)
"""


@pytest.fixture(scope="module")
def graded(
    tmp_path_factory: pytest.TempPathFactory, solution_cells
) -> dict[str, grade.NotebookResult]:
    """One class: an honest notebook, four forged verdicts and one built from the references."""
    root = tmp_path_factory.mktemp("trust")
    subs = root / "subs"
    name = f"{CH01}.ipynb"
    write(subs / "honest" / name, notebook(CH01, IMPORTS, *solution_cells(CH01, IDS01)))
    for student, patch in FORGERIES.items():
        write(subs / student / name, notebook(CH01, IMPORTS, WRONG, patch))
    write(subs / "references" / name, notebook(CH01, IMPORTS, REFERENCES))
    write(subs / "shortcuts" / name, notebook(CH01, IMPORTS, SHORTCUTS))
    results = grade.grade_dir(subs, root / "out" / "grades.csv", timeout=240, jobs=2, quiet=True)
    return {r.student: r for r in results}


def statuses(result: grade.NotebookResult) -> dict[str, str]:
    return {row["exercise"]: row["status"] for row in result.rows}


@pytest.mark.slow
def test_an_honest_notebook_passes_every_exercise(graded) -> None:
    assert statuses(graded["honest"]) == dict.fromkeys(IDS01, "passed"), graded["honest"].rows


@pytest.mark.slow
@pytest.mark.parametrize("student", list(FORGERIES))
def test_a_forged_verdict_changes_nothing(graded, student: str) -> None:
    result = graded[student]
    assert result.status == "graded", result.message
    assert statuses(result) == dict.fromkeys(IDS01, "failed"), result.rows
    softmax = next(r for r in result.rows if r["exercise"] == "softmax")
    assert "is wrong" in softmax["message"] or "should" in softmax["message"]


@pytest.mark.slow
def test_references_handed_in_fail_naming_the_reference(graded) -> None:
    rows = {r["exercise"]: r for r in graded["references"].rows}
    assert {r["status"] for r in rows.values()} == {"failed"}, rows
    for row in rows.values():
        assert "reference" in row["message"], row


@pytest.mark.slow
def test_shortcuts_through_torch_fail_naming_the_call_when_graded(graded) -> None:
    rows = {r["exercise"]: r for r in graded["shortcuts"].rows}
    for exercise, call in (
        ("softmax", "torch.softmax"),
        ("log_softmax", "F.log_softmax"),
        ("gumbel_softmax", "F.gumbel_softmax"),
    ):
        assert rows[exercise]["status"] == "failed", rows[exercise]
        assert f"called {call}" in rows[exercise]["message"], rows[exercise]


# ---- backward exercises through hidden autograd engines, graded --------------------------------
# The graphs are built through unfold and a matmul: F.conv2d itself is a forbidden call here.
CONV = """
def conv(x, w, stride, padding):
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    return (w.reshape(f, -1) @ cols).reshape(n, f, ho, wo)
"""
ENGINES = {
    "saved_run_backward": CONV
    + """
from torch.autograd.variable import Variable
_run = Variable._execution_engine.run_backward
def conv2d_backward(dout, x, weight, bias, stride=1, padding=0):
    with torch.enable_grad():
        xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()
        out = conv(xs, ws, stride, padding)
        dx, dw = _run((out,), (dout,), False, False, (xs, ws), False, True)
    return dx, dw, (None if bias is None else dout.sum((0, 2, 3)))
""",
    "fresh_engine": CONV
    + """
def conv2d_backward(dout, x, weight, bias, stride=1, padding=0):
    with torch.enable_grad():
        xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()
        out = conv(xs, ws, stride, padding)
        dx, dw = torch._C._ImperativeEngine().run_backward(
            (out,), (dout,), False, False, (xs, ws), False, True)
    return dx, dw, (None if bias is None else dout.sum((0, 2, 3)))
""",
    "nn_grad": """
from torch.nn.grad import conv2d_input, conv2d_weight
def conv2d_backward(dout, x, weight, bias, stride=1, padding=0):
    dx = conv2d_input(x.shape, weight, dout, stride=stride, padding=padding)
    dw = conv2d_weight(x, weight.shape, dout, stride=stride, padding=padding)
    return dx, dw, (None if bias is None else dout.sum((0, 2, 3)))
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("route", list(ENGINES))
def test_hidden_autograd_engines_fail_when_graded(tmp_path: Path, route: str) -> None:
    path = write(
        tmp_path / "02_convolution.ipynb",
        notebook("02_convolution", IMPORTS, ENGINES[route]),
    )
    result = grade.grade_notebook(path, timeout=120, exercise="conv2d_backward")
    [row] = result.rows
    assert row["status"] == "failed", row
    assert "derive the gradient by hand" in row["message"], row


@pytest.mark.slow
def test_a_class_and_an_alias_of_it_grade_as_the_class(tmp_path: Path, solution_cells) -> None:
    cells = solution_cells("00_gradient_checking", ["SiLUFunction"])
    path = write(
        tmp_path / "00_gradient_checking.ipynb",
        notebook(
            "00_gradient_checking",
            IMPORTS,
            *cells,
            "silu_function = SiLUFunction.apply",
            'cu.check("silu_function", SiLUFunction)',
        ),
    )
    result = grade.grade_notebook(path, timeout=120, exercise="silu_function")
    assert statuses(result) == {"silu_function": "passed"}, result.rows


@pytest.mark.slow
def test_a_learner_error_is_one_line_and_a_hang_is_stopped(tmp_path: Path) -> None:
    path = write(
        tmp_path / f"{CH01}.ipynb",
        notebook(
            CH01,
            IMPORTS,
            "def softmax(logits, dim=-1):\n    return logits.nope()",
            "def log_softmax(logits, dim=-1):\n    while True:\n        pass",
        ),
    )
    result = grade.grade_notebook(path, timeout=90, call_timeout=5)
    rows = {r["exercise"]: r for r in result.rows}
    assert rows["softmax"]["status"] == "failed"
    assert "AttributeError" in rows["softmax"]["message"] and "\n" not in rows["softmax"]["message"]
    assert rows["log_softmax"]["status"] == "failed"
    assert "did not return" in rows["log_softmax"]["message"]


# ---- the data that crosses from the kernel ---------------------------------------------------
def test_plain_and_decode_round_trip_plain_data_and_hide_objects(tmp_path: Path) -> None:
    import numpy as np

    from course_utils import agent

    value = {
        "t": torch.arange(3.0),
        "p": torch.nn.Parameter(torch.ones(2)),
        "l": [1, 2.5, "s", None, (True,)],
        "n": np.arange(4),
        "s": np.float64(2.0),
        "o": object(),
        "set": {"a", "b"},
    }
    path = tmp_path / "answer.pt"
    torch.save(agent.plain(value), path)
    back = remote.decode(torch.load(path, weights_only=True))
    assert torch.equal(back["t"], value["t"]) and type(back["p"]) is torch.Tensor
    assert back["l"] == [1, 2.5, "s", None, (True,)] and back["set"] == {"a", "b"}
    assert isinstance(back["n"], np.ndarray) and back["s"] == 2.0
    assert isinstance(back["o"], remote.Opaque) and back["o"].type_name == "object"
    assert checking._describe(back["o"]) == "a object"
    assert checking._describe(remote.Opaque("numpy.ndarray")) == "a numpy.ndarray"


# ---- distributed exercises: the world is forked inside the learner's kernel ------------------
CH15 = "15_tensor_parallel"
DIST_IMPORTS = IMPORTS + "\nimport torch.distributed as dist"

GATHERS_LOGITS = """
from torch.distributed import all_gather as gather_everything
def vocab_parallel_cross_entropy(logits_shard, target, vocab_start):
    widths = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    gather_everything(widths, torch.tensor([logits_shard.shape[1]]))
    return logits_shard.sum(1)
"""

# right alone; with partners rank 0 waits in an all-reduce that the others never join
DEADLOCKS = """
import time
def vocab_parallel_cross_entropy(logits_shard, target, vocab_start):
    if dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            dist.all_reduce(torch.ones(1))
        else:
            time.sleep(60)
    m = logits_shard.max(1, keepdim=True).values
    lse = (m + (logits_shard - m).exp().sum(1, keepdim=True).log()).squeeze(1)
    return lse - logits_shard.gather(1, target[:, None]).squeeze(1)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "student, status, says",
    [
        ("honest", "passed", "checks passed"),
        ("gathers", "failed", "called dist.all_gather"),
        ("deadlocks", "failed", "rank 0 is waiting in dist.all_reduce"),
    ],
)
def test_a_distributed_exercise_is_judged_in_the_grader_rank_by_rank(
    tmp_path: Path, solution_cells, student: str, status: str, says: str
) -> None:
    sources = {
        "honest": solution_cells(CH15, ["vocab_parallel_cross_entropy"]),
        "gathers": [GATHERS_LOGITS],
        "deadlocks": [DEADLOCKS],
    }[student]
    path = write(tmp_path / f"{CH15}.ipynb", notebook(CH15, DIST_IMPORTS, *sources))
    result = grade.grade_notebook(path, timeout=180, exercise="vocab_parallel_cross_entropy")
    [row] = result.rows
    assert row["status"] == status and says in row["message"], row
    assert "\n" not in row["message"]


def test_a_class_with_a_once_differentiable_backward_is_rebuilt_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    from course_utils import agent

    namespace: dict = {}
    exec(  # a class defined in a notebook cell, not importable by name
        "import torch\n"
        "class Twice(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x * 2\n"
        "    @staticmethod\n"
        "    @torch.autograd.function.once_differentiable\n"
        "    def backward(ctx, g):\n"
        "        return g * 2\n",
        namespace,
    )
    blob = tmp_path / "class.pkl"
    blob.write_bytes(agent.export_bytes(namespace["Twice"]))
    code = (
        "import cloudpickle, torch, sys; c = cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
        "x = torch.ones(3, requires_grad=True); c.apply(x).sum().backward(); print(x.grad.tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "[2.0, 2.0, 2.0]"


@pytest.mark.slow
def test_a_dict_argument_the_contract_updates_is_judged_as_the_kernel_left_it(
    tmp_path: Path,
) -> None:
    # chapter 06's small_cnn_loss updates bn_state in place: the grader must judge the update
    # the kernel made, not its own untouched copy of the argument
    chapter = "06_normalization"
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "solutions" / f"{chapter}.ipynb", 4)
    sources = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            sources.append(cell.source)
            if cell.source.startswith("def small_cnn_loss("):
                break
    path = write(tmp_path / f"{chapter}.ipynb", notebook(chapter, *sources))
    result = grade.grade_notebook(path, timeout=240, exercise="small_cnn_loss")
    assert statuses(result) == {"small_cnn_loss": "passed"}, result.rows
