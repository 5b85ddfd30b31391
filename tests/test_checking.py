"""Unit tests of course_utils.checking: the check API's guarantees, on a throwaway exercise."""

import time

import pytest
import torch

import course_utils as cu
from course_utils import checking
from course_utils.checking import REGISTRY, Tester, exercise


def _ref_double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def _ref_double_backward(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 2 * dout


@pytest.fixture
def toy_exercises():
    """Register a forward and a backward toy exercise for the duration of one test."""

    @exercise(
        "toy_double",
        chapter="99_toy",
        signature="(x) -> Tensor",
        summary="2x",
        reference=_ref_double,
    )
    def _battery(t: Tester) -> None:
        for shape in ((3,), (2, 4)):
            for dtype in (torch.float64, torch.float32):
                x = t.randn(*shape, dtype=dtype)
                case = f"x {shape} {dtype}"
                t.compare(
                    case, "out", t.call(case, x), 2 * x, mistakes=[("you returned x + 2.", x + 2)]
                )

    @exercise(
        "toy_double_backward",
        chapter="99_toy",
        signature="(dout, x) -> Tensor",
        summary="d(2x)",
        reference=_ref_double_backward,
        backward=True,
    )
    def _battery_b(t: Tester) -> None:
        x, dout = t.randn(3), t.randn(3)
        t.compare("x (3,)", "dx", t.call("x (3,)", dout, x), 2 * dout)

    yield
    REGISTRY.pop("toy_double")
    REGISTRY.pop("toy_double_backward")


def test_correct_function_passes_and_report_prints_a_table(toy_exercises):
    report = cu.check("toy_double", lambda x: x * 2)
    assert report.passed and report.status == "passed"
    text = str(report)
    assert "toy_double: passed 4 checks" in text
    assert "max rel err" in text and "verdict" in text
    assert "<table>" in report._repr_html_()


def test_wrong_answer_names_case_quantity_error_index_and_mistake(toy_exercises):
    with pytest.raises(cu.CheckFailure) as info:
        cu.check("toy_double", lambda x: x + 2)
    msg = str(info.value)
    assert msg.startswith("toy_double: in case x (3,) torch.float64")
    assert "`out` is wrong: max relative error" in msg
    assert "at index (" in msg
    assert "It looks like you returned x + 2." in msg
    assert isinstance(info.value, AssertionError)


def test_generic_diagnoses_sign_and_constant_factor(toy_exercises):
    with pytest.raises(cu.CheckFailure, match="sign is flipped"):
        cu.check("toy_double", lambda x: -2 * x)
    with pytest.raises(cu.CheckFailure, match="constant factor of 0.5"):
        cu.check("toy_double", lambda x: x)


def test_a_scalar_or_a_pair_is_never_off_by_a_constant_factor(toy_exercises):
    # Any two numbers differ by a constant factor; a clamped loss (23.03 for 12968.3) was told
    # "such as 1/N", which sent learners after a bug that was not there.
    t = Tester(checking.get_exercise("toy_double"), _ref_double, 0)
    f64 = torch.float64
    for got, want in (
        (torch.tensor(23.0259, dtype=f64), torch.tensor(12968.3, dtype=f64)),
        (torch.tensor([2.0], dtype=f64), torch.tensor([1.0], dtype=f64)),
        (torch.tensor([2.0, 4.0], dtype=f64), torch.tensor([1.0, 2.0], dtype=f64)),
        (torch.tensor([2.0, 0.0, 0.0], dtype=f64), torch.tensor([1.0, 0.0, 0.0], dtype=f64)),
    ):
        assert "constant factor" not in t._diagnose(got, want, 1e-7, 1e-10, (), True)
    three = torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    assert "constant factor of 2 " in t._diagnose(2 * three, three, 1e-7, 1e-10, (), True)
    assert "sign is flipped" in t._diagnose(-three[:1], three[:1], 1e-7, 1e-10, (), True)


def test_pending_in_learn_mode_and_failure_in_strict_mode(toy_exercises, monkeypatch, capsys):
    def stub(x):
        raise NotImplementedError("toy_double: write me")

    monkeypatch.delenv("COURSE_STRICT", raising=False)
    report = cu.check("toy_double", stub)
    assert report.status == "pending"
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check("toy_double", stub, strict=True)
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(cu.CheckFailure, match="strict mode"):
        cu.check("toy_double", stub)
    assert cu.check("toy_double", stub, strict=False).status == "pending"


@pytest.mark.parametrize(
    ("fn", "pattern"),
    [
        (lambda x: (2 * x).reshape(-1, 1), r"should have shape \(3,\), but it has shape \(3, 1\)"),
        (lambda x: (2 * x).to(torch.float16), "should have dtype float64"),
        (lambda x: (2 * x).numpy(), "should be a tensor .* but it is a numpy.ndarray"),
        (lambda x: (2 * x).tolist(), "but it is a list"),
        (lambda x: None, "but it is None"),
    ],
)
def test_wrong_type_shape_dtype_are_one_sentence(toy_exercises, fn, pattern):
    with pytest.raises(cu.CheckFailure, match=pattern) as info:
        cu.check("toy_double", fn)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_exception_inside_learner_code_is_reported_with_its_line(toy_exercises):
    def broken(x):
        y = x * 2
        return y[10]

    with pytest.raises(
        cu.CheckFailure,
        match=r"broken raised IndexError: .* \(in broken, line \d+: `return y\[10\]`\)",
    ):
        cu.check("toy_double", broken)


def test_autograd_is_refused_in_backward_exercises(toy_exercises):
    def via_backward(dout, x):
        x = x.clone().requires_grad_(True)
        (2 * x).backward(dout)
        return x.grad

    def via_grad(dout, x):
        x = x.clone().requires_grad_(True)
        return torch.autograd.grad(2 * x, x, dout)[0]

    for fn in (via_backward, via_grad):
        with pytest.raises(cu.CheckFailure, match="derive the gradient by hand"):
            cu.check("toy_double_backward", fn)
    # autograd works again afterwards
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))
    assert cu.check("toy_double_backward", lambda dout, x: dout * 2).passed


def test_inputs_changed_in_place_are_caught(toy_exercises):
    def in_place(x):
        x *= 2
        return x

    with pytest.raises(cu.CheckFailure, match="changed its input `x` in place"):
        cu.check("toy_double", in_place)


def test_checks_are_deterministic_per_seed_and_keep_the_global_rng(toy_exercises):
    seen = []

    def spy(x):
        seen.append(x.clone())
        return 2 * x

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    cu.check("toy_double", spy, seed=5)
    first = list(seen)
    seen.clear()
    cu.check("toy_double", spy, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, seen, strict=True))
    seen.clear()
    cu.check("toy_double", spy, seed=6)
    assert not torch.equal(first[0], seen[0])
    assert torch.equal(torch.rand(3), expected_next)  # the learner's random stream is untouched


def test_unknown_id_lists_close_matches():
    with pytest.raises(KeyError, match="Did you mean 'softmax'"):
        cu.check("sofmax", lambda x: x)


def test_non_callable_and_exercises_listing():
    with pytest.raises(cu.CheckFailure, match="expected a function"):
        cu.check("softmax", 42)
    listing = cu.exercises()
    ids = [e.id for e in listing]
    for needed in (
        "softmax",
        "log_softmax",
        "cross_entropy",
        "group_softmax_cross_entropy",
        "gumbel_softmax",
    ):
        assert needed in ids
    assert all(e.id.startswith(("numerical", "silu")) for e in cu.exercises("00"))
    assert "softmax" in str(listing)


def test_learner_or_reference_switches_after_a_pass(toy_exercises, capsys):
    def mine(x):
        return x + x

    checking._LAST_STATUS.pop("toy_double", None)
    assert cu.learner_or_reference("toy_double", mine) is _ref_double
    assert "reference" in capsys.readouterr().out
    cu.check("toy_double", mine)
    assert cu.learner_or_reference("toy_double", mine) is mine
    assert cu.last_status("toy_double") == "passed"


@pytest.mark.forbidden_calls_allowed
def test_every_registered_reference_passes_its_own_battery_quickly():
    """Every exercise's reference passes its battery at seed 0 (the one home of this test)."""
    for ex in cu.exercises():
        start = time.perf_counter()
        assert cu.check(ex.id, ex.reference).passed
        # Generous here (a loaded CI machine); the benchmark script records the real figures.
        assert time.perf_counter() - start < 5 * ex.budget


def test_check_failure_renders_without_checker_frames_in_ipython():
    err = cu.CheckFailure("softmax: in case x, wrong")
    assert err._render_traceback_() == ["\x1b[31mCheckFailure\x1b[0m: softmax: in case x, wrong"]


def test_autograd_imported_early_and_reenabled_is_still_refused(toy_exercises):
    from torch.autograd import grad as early_grad

    def sneaky(dout, x):
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            return early_grad(2 * x, x, dout)[0]

    with pytest.raises(cu.CheckFailure, match="derive the gradient by hand"):
        cu.check("toy_double_backward", sneaky)
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))


def test_check_runs_on_one_thread_and_restores_the_setting(toy_exercises):
    seen = []
    before = torch.get_num_threads()
    cu.check("toy_double", lambda x: seen.append(torch.get_num_threads()) or 2 * x)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


FUNCTION_EXERCISES = [e.id for e in cu.exercises() if not e.signature.startswith("class")]


def _stub(*args, **kwargs):
    raise NotImplementedError("write me")


@pytest.mark.parametrize("exercise_id", FUNCTION_EXERCISES)
def test_every_function_exercise_reports_a_stub_as_pending(exercise_id, monkeypatch, capsys):
    """Learn mode: pending and one printed line; strict (argument or COURSE_STRICT): a failure."""
    monkeypatch.delenv("COURSE_STRICT", raising=False)
    report = cu.check(exercise_id, _stub)
    assert report.status == "pending"
    assert f"{exercise_id}: not implemented yet" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check(exercise_id, _stub, strict=True)
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(cu.CheckFailure, match="strict mode"):
        cu.check(exercise_id, _stub)


def test_a_pending_report_displays_nothing_and_a_passed_one_its_table(monkeypatch) -> None:
    import IPython.display

    shown: list = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append(a[0]))
    checking.Report("softmax", "pending", message="write it")._ipython_display_()
    assert shown == []  # no empty output area under the pending line
    row = checking.Row("c", "out", 0.0, 0.0, "ok")
    checking.Report("softmax", "passed", [row])._ipython_display_()
    assert "passed 1 checks" in shown[0]["text/html"] and "passed" in shown[0]["text/plain"]
