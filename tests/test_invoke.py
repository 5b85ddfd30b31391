"""course_utils.invoke: the guards around one learner call, in learn mode (this process)."""

from __future__ import annotations

import hashlib
import marshal
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.variable import Variable

import course_utils as cu
from course_utils import invoke
from course_utils.checks import ch02_convolution as ch02

CONV = {"stride": 1, "padding": 1}


def _conv(x, w, stride, padding):
    """conv2d through unfold and a matmul: a graph without the forbidden F.conv2d."""
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, C*kh*kw, Ho*Wo)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    return (w.reshape(f, -1) @ cols).reshape(n, f, ho, wo)


def _conv_backward_by(engine_route):
    """A conv2d_backward that gets its gradients from autograd through ``engine_route``."""

    def conv2d_backward(dout, x, weight, bias, stride=1, padding=0):
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            ws = weight.detach().requires_grad_(True)
            bs = None if bias is None else bias.detach().requires_grad_(True)
            out = _conv(xs, ws, stride, padding)
            if bs is not None:
                out = out + bs[:, None, None]
            inputs = (xs, ws) if bs is None else (xs, ws, bs)
            grads = engine_route(out, dout, inputs)
        dx, dw = grads[0], grads[1]
        return dx, dw, (None if bias is None else grads[2])

    return conv2d_backward


SAVED_RUN_BACKWARD = Variable._execution_engine.run_backward


def _saved_engine(out, dout, inputs):
    return SAVED_RUN_BACKWARD((out,), (dout,), False, False, inputs, False, True)


def _fresh_engine(out, dout, inputs):
    return torch._C._ImperativeEngine().run_backward(
        (out,), (dout,), False, False, inputs, False, True
    )


def _nn_grad(dout, x, weight, bias, stride=1, padding=0):
    dx = torch.nn.grad.conv2d_input(x.shape, weight, dout, stride=stride, padding=padding)
    dw = torch.nn.grad.conv2d_weight(x, weight.shape, dout, stride=stride, padding=padding)
    return dx, dw, (None if bias is None else dout.sum((0, 2, 3)))


NN_GRAD_INPUT = torch.nn.grad.conv2d_input
NN_GRAD_WEIGHT = torch.nn.grad.conv2d_weight


def _nn_grad_saved(dout, x, weight, bias, stride=1, padding=0):
    dx = NN_GRAD_INPUT(x.shape, weight, dout, stride=stride, padding=padding)
    dw = NN_GRAD_WEIGHT(x, weight.shape, dout, stride=stride, padding=padding)
    return dx, dw, (None if bias is None else dout.sum((0, 2, 3)))


def _aten_backward(dout, x, weight, bias, stride=1, padding=0):
    s, p = (stride, stride), (padding, padding)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dout, x, weight, [weight.shape[0]], s, p, (1, 1), False, (0, 0), 1, [True, True, True]
    )
    return dx, dw, (None if bias is None else db)


def _swallowing(dout, x, weight, bias, stride=1, padding=0):
    # Catching the guard's exception does not erase the record of the attempt.
    try:
        out = _conv_backward_by(_saved_engine)(dout, x, weight, bias, stride, padding)
    except Exception:  # noqa: BLE001
        out = ch02.ref_conv2d_backward(dout, x, weight, bias, stride, padding)
    return out


@pytest.mark.parametrize(
    "fn, named",
    [
        (_conv_backward_by(_saved_engine), "autograd graph"),
        (_conv_backward_by(_fresh_engine), "autograd graph"),
        (_nn_grad, "torch.nn.grad.conv2d_input"),
        (_nn_grad_saved, "backward kernel convolution_backward"),
        (_aten_backward, "backward kernel convolution_backward"),
    ],
    ids=["saved-run_backward", "fresh-engine", "nn.grad", "nn.grad-saved", "aten-backward"],
)
def test_hidden_autograd_engines_are_refused(fn, named: str) -> None:
    with pytest.raises(cu.CheckFailure, match="derive the gradient by hand") as err:
        cu.check("conv2d_backward", fn)
    assert named in str(err.value)


@pytest.mark.references_forbidden
def test_a_caught_guard_exception_still_fails() -> None:
    with pytest.raises(cu.CheckFailure, match="called autograd|reference"):
        cu.check("conv2d_backward", _swallowing)


@pytest.mark.references_forbidden
@pytest.mark.parametrize(
    "make",
    [
        lambda: cu.reference("softmax"),
        lambda: (
            __import__(
                "course_utils.checks.ch01_logits_softmax_cross_entropy", fromlist=["x"]
            ).ref_softmax
        ),
        lambda: lambda logits, dim=-1: cu.reference("softmax")(logits, dim),
    ],
    ids=["cu.reference", "imported ref_", "wrapper"],
)
def test_references_are_never_an_answer(make) -> None:
    with pytest.raises(cu.CheckFailure, match="reference"):
        cu.check("softmax", make())


@pytest.mark.references_forbidden
def test_the_reference_works_again_after_a_refused_call() -> None:
    ref = cu.reference("softmax")
    with pytest.raises(cu.CheckFailure):
        cu.check("softmax", lambda logits, dim=-1: ref(logits, dim))
    x = torch.randn(3, 4)
    assert torch.allclose(ref(x), torch.softmax(x, -1))


def test_a_removed_watch_is_a_broken_guard() -> None:
    def sneaky(q, k, v, block_size=64, is_causal=False):
        if torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    with pytest.raises(cu.CheckFailure, match="guard of the check was switched off|L x S"):
        cu.check("flash_attention_forward", sneaky)


def test_invoke_returns_data_and_never_raises() -> None:
    assert invoke.invoke(lambda x: x + 1, (1,), {})["value"] == 2
    out = invoke.invoke(lambda: 1 / 0, (), {})
    assert out["kind"] == "error" and out["error_type"] == "ZeroDivisionError"
    assert (
        invoke.invoke(lambda: (_ for _ in ()).throw(NotImplementedError("x")), (), {})["kind"]
        == "pending"
    )

    def exits():
        raise SystemExit(3)

    assert invoke.invoke(exits, (), {})["kind"] == "error"


def test_code_fingerprint_sees_copies_not_lookalikes() -> None:
    ref = cu.reference("softmax")
    copy = type(ref)(ref.__code__, {}, "softmax")
    assert invoke.code_fingerprint(copy) == invoke.code_fingerprint(ref) != ""

    def own(logits, dim=-1):
        return torch.softmax(logits, dim)

    assert invoke.code_fingerprint(own) != invoke.code_fingerprint(ref)
    assert invoke.code_fingerprint(42) == ""


def test_a_backward_kernel_called_through_torch_ops_is_refused() -> None:
    def bn_backward(dout, x, gamma, eps=1e-5):
        mean, var = x.mean(0), x.var(0, unbiased=False)
        invstd = (var + eps).rsqrt()
        dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dout, x, gamma, None, None, mean, invstd, True, eps, [True, True, True]
        )
        return dx, dgamma, dbeta

    with pytest.raises(cu.CheckFailure, match="backward kernel native_batch_norm_backward"):
        cu.check("batchnorm_backward", bn_backward)


def test_a_reference_imported_by_two_batteries_is_restored_after_the_call() -> None:
    import sys
    import types

    from course_utils import invoke as inv
    from course_utils.checks import ch06_normalization as ch06

    # a second battery module that binds the same reference under its own name
    twin = types.ModuleType("course_utils.checks.ch99_twin")
    twin.ref_rmsnorm_forward = ch06.ref_rmsnorm_forward
    code = ch06.ref_rmsnorm_forward.__code__
    sys.modules[twin.__name__] = twin
    try:
        assert inv.reference_functions().count(ch06.ref_rmsnorm_forward) == 1
        inv.invoke(lambda: None, (), {})
    finally:
        del sys.modules[twin.__name__]
    assert ch06.ref_rmsnorm_forward.__code__ is code


def _plain_scan() -> set[int]:
    """What reference_functions must return, found the slow way: every module, every call."""
    import sys
    import types

    return {
        id(value)
        for name, module in list(sys.modules.items())
        if name.startswith("course_utils.checks.") and module is not None
        for attr, value in vars(module).items()
        if attr.startswith("ref_") and isinstance(value, types.FunctionType)
    }


def test_reference_functions_follow_added_replaced_and_removed_references(monkeypatch) -> None:
    import sys
    import types

    from course_utils.checks import ch06_normalization as ch06

    assert {id(f) for f in invoke.reference_functions()} == _plain_scan()
    # a battery module imported after the first scan
    late = types.ModuleType("course_utils.checks.ch98_late")

    def ref_late(x):
        return x

    late.ref_late = ref_late
    monkeypatch.setitem(sys.modules, late.__name__, late)
    assert ref_late in invoke.reference_functions()

    # a reference added to, and one replaced in, a module already scanned (same namespace size)
    def ref_added(x):
        return x

    late.ref_added = ref_added
    assert ref_added in invoke.reference_functions()

    def ref_replacement(x, eps=1e-6):
        return x

    original = ch06.ref_rmsnorm_forward
    monkeypatch.setattr(ch06, "ref_rmsnorm_forward", ref_replacement)
    refs = invoke.reference_functions()
    assert ref_replacement in refs and original not in refs
    assert {id(f) for f in refs} == _plain_scan()
    monkeypatch.undo()
    refs = invoke.reference_functions()
    assert original in refs and ref_late not in refs and ref_replacement not in refs
    assert {id(f) for f in refs} == _plain_scan()


def test_op_names_are_remembered_per_callable_and_unhashable_callables_still_work() -> None:
    calls = {
        torch.softmax: ("torch", "softmax"),
        F.softmax: ("F", "softmax"),
        torch.Tensor.softmax: ("Tensor", "softmax"),
        torch.ops.aten._softmax.default: ("aten", "softmax"),
        torch.special.log_softmax: ("torch", "log_softmax"),
        torch.linalg.vector_norm: ("torch", "vector_norm"),
    }
    for _ in range(2):  # the second round answers from what the first remembered
        assert {f: invoke.op_name(f) for f in calls} == calls

    class Unhashable:
        __name__ = "softmax"
        __eq__ = object.__eq__  # defining __eq__ alone makes instances unhashable

        def __call__(self, x):
            return x

    for _ in range(2):
        assert invoke.op_name(Unhashable()) == ("torch", "softmax")
    assert invoke.forbidden_match(torch.softmax, ("softmax",)) == "torch.softmax"
    assert invoke.forbidden_match(torch.exp, ("softmax",)) == ""


def test_code_fingerprint_follows_the_code_object_not_a_reused_id() -> None:
    def f(x):
        return x + 1

    def g(x):
        return x * 2

    before = invoke.code_fingerprint(f)
    f.__code__ = g.__code__
    assert invoke.code_fingerprint(f) == invoke.code_fingerprint(g) != before

    def h(x):
        return x - 1

    # An entry whose id matches but whose code is another object (an id reused after the code
    # it was cached for was freed) must not be believed.
    invoke._CODE_DIGESTS[id(h.__code__)] = (g.__code__, b"stale", "stale")
    assert invoke.code_fingerprint(h) not in ("stale", invoke.code_fingerprint(g))

    class Two:
        def a(self):
            return 1

        def b(self):
            return 2

    def by_hand(*codes):
        digest = hashlib.sha256()
        for code in codes:
            digest.update(marshal.dumps(code.replace(co_filename="", co_firstlineno=1)))
        return digest.hexdigest()

    for _ in range(2):  # computed, then remembered
        assert invoke.code_fingerprint(Two) == by_hand(Two.a.__code__, Two.b.__code__)
        assert invoke.code_fingerprint(g) == by_hand(g.__code__)


def test_a_check_seeds_its_cases_without_queueing_device_seeds_or_moving_the_callers_stream(
    monkeypatch,
) -> None:
    # torch.manual_seed queues a seeding of each device type not yet started, formatting a
    # stack trace for each: milliseconds per check, thousands of checks in a battery's tests.
    stacks = []
    real_format_stack = traceback.format_stack
    monkeypatch.setattr(
        traceback, "format_stack", lambda *a, **k: stacks.append(1) or real_format_stack(*a, **k)
    )

    def softmax(logits, dim=-1):
        e = torch.exp(logits - logits.amax(dim, keepdim=True))
        return e / e.sum(dim, keepdim=True)

    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    stacks.clear()
    assert cu.check("softmax", softmax).passed
    assert torch.equal(torch.rand(4), expected_next)  # the caller's stream is untouched
    if not torch.cuda.is_initialized():
        assert stacks == []
