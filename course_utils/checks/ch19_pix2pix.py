"""Check batteries of chapter 19: pix2pix's discriminator loss, generator loss and training step.

Every exercise receives networks (and the step also optimizers), which cannot travel to the
learner's kernel when grading. So each case runs through a module-level probe: it builds small
networks from plain tensors where the learner's function lives, calls the function and returns
plain data (the loss and its gradients, or the parameters after each step with a trace of what
ran in which order). The battery recomputes the same with the references and judges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checking import Tester, exercise
from ..distributed import load_optimizer_machinery

CHAPTER = "19_pix2pix"
Tensor = torch.Tensor


# ---- references ------------------------------------------------------------------------------
def _bce(logits: Tensor, label: float) -> Tensor:
    """Binary cross-entropy with logits against a constant label, averaged over every entry."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def ref_pix2pix_discriminator_loss(
    disc: Callable[[Tensor], Tensor], real_a: Tensor, real_b: Tensor, fake_b: Tensor
) -> Tensor:
    """0.5 * (BCE(D(a, b), 1) + BCE(D(a, G(a)), 0)), the fake detached so that only D learns."""
    pred_real = disc(torch.cat([real_a, real_b], dim=1))  # (N, 1, H', W') patch logits
    pred_fake = disc(torch.cat([real_a, fake_b.detach()], dim=1))
    return 0.5 * (_bce(pred_real, 1.0) + _bce(pred_fake, 0.0))


def ref_pix2pix_generator_loss(
    disc: Callable[[Tensor], Tensor],
    real_a: Tensor,
    real_b: Tensor,
    fake_b: Tensor,
    lambda_l1: float = 100.0,
) -> Tensor:
    """BCE(D(a, G(a)), 1) + lambda_l1 * mean |G(a) - b|: the non-saturating GAN term plus L1."""
    pred_fake = disc(torch.cat([real_a, fake_b], dim=1))
    return _bce(pred_fake, 1.0) + lambda_l1 * (fake_b - real_b).abs().mean()


def ref_pix2pix_train_step(
    gen: nn.Module,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real_a: Tensor,
    real_b: Tensor,
    lambda_l1: float = 100.0,
) -> tuple[float, float]:
    """One step of pix2pix's optimize_parameters: update D, then G against the updated D."""
    fake_b = gen(real_a)
    opt_d.zero_grad()
    loss_d = ref_pix2pix_discriminator_loss(disc, real_a, real_b, fake_b)
    loss_d.backward()
    opt_d.step()
    # D needs no gradient while G learns: it is not stepped, and it would only cost time.
    disc.requires_grad_(False)
    opt_g.zero_grad()
    loss_g = ref_pix2pix_generator_loss(disc, real_a, real_b, fake_b, lambda_l1)
    loss_g.backward()
    opt_g.step()
    disc.requires_grad_(True)
    return loss_d.item(), loss_g.item()


# ---- the small networks the probes build -------------------------------------------------------
#: What the networks write into the step probe's trace: a gradient reaching the generator's
#: output, and the discriminator called on an input that carries gradient (a fake being scored
#: for the generator's loss).
GRAD_INTO_GEN = "gradient into gen's output"
DISC_ON_LIVE_FAKE = "disc on a fake that carries gradient"


class ProbeDiscriminator(nn.Module):
    """A conditional patch discriminator for the checks.

    torch.cat([a, b], dim=1) of shape (N, Ca + Cb, H, W) -> patch logits (N, 1, ceil(H/2), ceil(W/2)).
    It refuses, with one sentence, an input that is not such a pair.
    """

    def __init__(self, in_a: int, in_b: int, hidden: int = 4) -> None:
        super().__init__()
        self.in_a, self.in_b = in_a, in_b
        self.trace: list[str] | None = None  # the step's probe records each call here
        self.conv1 = nn.Conv2d(in_a + in_b, hidden, 3, 2, 1)
        self.conv2 = nn.Conv2d(hidden, 1, 3, 1, 1)

    def forward(self, ab: Tensor) -> Tensor:
        """(N, Ca + Cb, H, W) -> (N, 1, H', W') logits."""
        want = self.in_a + self.in_b
        if not torch.is_tensor(ab) or ab.dim() != 4 or ab.shape[1] != want:
            raise ValueError(_disc_input_message(ab, self.in_a, self.in_b))
        if self.trace is not None:
            self.trace.append(DISC_ON_LIVE_FAKE if ab.requires_grad else "disc")
        return self.conv2(F.leaky_relu(self.conv1(ab), 0.2))


def _disc_input_message(ab: Any, in_a: int, in_b: int) -> str:
    pair = f"torch.cat([a, b], dim=1), of shape (N, {in_a} + {in_b}, H, W)"
    if not torch.is_tensor(ab):
        return f"disc takes one tensor, {pair}, but it was called on a {type(ab).__name__}."
    got = f"disc was called on a tensor of shape {tuple(ab.shape)}"
    if ab.dim() == 4 and ab.shape[1] in (in_a, in_b):
        return (
            f"{got}, one image alone: it looks like an unconditional discriminator. pix2pix's "
            f"discriminator judges the pair (input, output): call it on {pair}."
        )
    return f"{got}; it takes the input and the output image stacked along the channels, {pair}."


class ProbeGenerator(nn.Module):
    """A two-convolution generator for the checks: (N, Ca, H, W) -> tanh output (N, Cb, H, W)."""

    def __init__(self, in_a: int, in_b: int, hidden: int = 4) -> None:
        super().__init__()
        self.in_a = in_a
        self.trace: list[str] | None = None  # the step's probe records each call here
        self.conv1 = nn.Conv2d(in_a, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, in_b, 3, 1, 1)

    def forward(self, a: Tensor) -> Tensor:
        """(N, Ca, H, W) -> (N, Cb, H, W) in (-1, 1)."""
        if not torch.is_tensor(a) or a.dim() != 4 or a.shape[1] != self.in_a:
            shape = tuple(a.shape) if torch.is_tensor(a) else type(a).__name__
            raise ValueError(
                f"gen was called on {shape}; it maps the input image real_a, of shape "
                f"(N, {self.in_a}, H, W), to the fake output image."
            )
        out = torch.tanh(self.conv2(F.leaky_relu(self.conv1(a), 0.2)))
        if self.trace is not None:
            trace = self.trace
            trace.append("gen")
            if out.requires_grad:
                out.register_hook(lambda _grad: trace.append(GRAD_INTO_GEN))
        return out


def _build(cls: type[nn.Module], weights: dict[str, Tensor], in_a: int, in_b: int) -> nn.Module:
    """An instance of ``cls`` holding ``weights``, in their dtype."""
    dtype = next(iter(weights.values())).dtype
    module = cls(in_a, in_b).to(dtype)
    module.load_state_dict(weights)
    return module


def _random_weights(t: Tester, cls: type[nn.Module], in_a: int, in_b: int, dtype) -> dict:
    """Weights from the check's generator, std gain/sqrt(fan_in): logits and outputs of order 1."""
    shapes = {k: v.shape for k, v in cls(in_a, in_b).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        gain = 2.0 if name.endswith("weight") else 0.3
        scale = gain / math.sqrt(fan_in) if len(shape) > 1 else gain
        out[name] = t.randn(*shape, scale=scale).to(dtype)
    return out


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


# ---- the losses: probe, cases, mistakes ----------------------------------------------------------
#: RuntimeErrors the probes turn into a sentence, by a phrase of PyTorch's message.
KNOWN_ERRORS = {
    "between 0 and 1": (
        "F.binary_cross_entropy was given disc's raw output, which is a logit (any real number), "
        "not a probability. Use F.binary_cross_entropy_with_logits on the logits (it applies the "
        "sigmoid itself, stably)."
    ),
    "modified by an inplace operation": (
        "backward() needed the discriminator's weights as they were when the loss was computed, "
        "but opt_d.step() had changed them in place since. It looks like the generator's loss was "
        "computed before the discriminator's step and backpropagated after it: compute it after "
        "opt_d.step(), so that the fake is scored by the updated discriminator (pix2pix's order)."
    ),
    "backward through the graph a second time": (
        "the generator's graph was already freed by an earlier backward(). It looks like the fake "
        "image was not detached in the discriminator's loss, so loss_d.backward() ran through the "
        "generator too: score the fake as disc(torch.cat([real_a, fake_b.detach()], dim=1)) in "
        "the D step."
    ),
    "does not require grad": (
        "a loss passed to backward() does not require grad. It looks like the discriminator's "
        "parameters were frozen (requires_grad_(False)) for the generator's step and not unfrozen "
        "before the next discriminator step, or the fake image was detached in the generator's loss."
    ),
}


def _known_error(err: RuntimeError) -> str:
    text = str(err)
    return next((key for key in KNOWN_ERRORS if key in text), "")


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        return None


def probe_loss(
    fn: Callable[..., Any],
    disc_weights: dict[str, Tensor],
    real_a: Tensor,
    real_b: Tensor,
    fake_b: Tensor,
    *rest: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run where the learner's loss lives: its value, and its gradients in fake_b and in disc's weights."""
    disc = _build(ProbeDiscriminator, disc_weights, real_a.shape[1], real_b.shape[1])
    fake = fake_b.clone().requires_grad_(
        True
    )  # as the generator's output would: it carries gradient
    try:
        out = fn(disc, real_a, real_b, fake, *rest, **kwargs)
    except RuntimeError as err:
        key = _known_error(err)
        if not key:
            raise
        return {"type": "error", "error": key}
    if not torch.is_tensor(out):
        return {"type": type(out).__name__, "number": _number(out)}
    seen: dict[str, Any] = {"type": "Tensor", "loss": out.detach().clone(), "d_fake": None}
    seen["requires_grad"] = bool(out.requires_grad)
    params = list(disc.parameters())
    live = [p for p in params if p.requires_grad]
    seen["disc_frozen"] = len(live) < len(params)
    if out.requires_grad and out.numel() == 1:
        grads = torch.autograd.grad(out.sum(), [fake, *live], allow_unused=True)
        if grads[0] is not None:
            seen["d_fake"] = grads[0].detach()
        by_param = dict(zip(map(id, live), grads[1:], strict=True))
        seen["d_disc"] = torch.cat(
            [
                torch.zeros_like(p).reshape(-1)
                if by_param.get(id(p)) is None
                else by_param[id(p)].reshape(-1)
                for p in params
            ]
        )
    return seen


def _loss_cases(t: Tester, with_lambda: bool) -> list[tuple[str, tuple, dict]]:
    """(case, (disc_weights, real_a, real_b, fake_b), kwargs) on float64 and float32, 1 or 3 channels."""
    settings = [
        (2, 1, 3, 8, 8, torch.float64, {}),
        (3, 3, 3, 6, 10, torch.float64, {"lambda_l1": 10.0}),
        (1, 1, 3, 8, 6, torch.float32, {"lambda_l1": 100.0}),
        (2, 2, 3, 5, 7, torch.float64, {"lambda_l1": 1.0}),
        (2, 3, 3, 6, 6, torch.float64, {"lambda_l1": 0.0}),
    ]
    cases = []
    for n, ca, cb, h, w, dtype, kwargs in settings:
        if not with_lambda and kwargs.get("lambda_l1") in (0.0, 1.0):
            continue
        weights = _random_weights(t, ProbeDiscriminator, ca, cb, dtype)
        real_a = torch.sign(t.randn(n, ca, h, w)).to(dtype)  # an edge map: -1 or 1
        real_b = torch.tanh(t.randn(n, cb, h, w, scale=1.5)).to(dtype)
        fake_b = torch.tanh(t.randn(n, cb, h, w)).to(dtype)
        name = (
            f"a {tuple(real_a.shape)}, b {tuple(real_b.shape)} {str(dtype).replace('torch.', '')}"
        )
        if with_lambda:
            name += f", lambda_l1={kwargs['lambda_l1']}" if kwargs else ", default lambda_l1"
        cases.append((name, (weights, real_a, real_b, fake_b), kwargs if with_lambda else {}))
    return cases


def _scores(disc: nn.Module, a: Tensor, b: Tensor, order: str = "ab") -> Tensor:
    return disc(torch.cat([a, b] if order == "ab" else [b, a], dim=1))


def _judge_loss_value(
    t: Tester, case: str, seen: dict[str, Any], expected: Tensor, mistakes: list
) -> None:
    if seen["type"] == "error":
        t.fail(case, KNOWN_ERRORS[seen["error"]])
    if seen["type"] != "Tensor":
        number = "" if seen.get("number") is None else f" ({seen['number']:.6g})"
        t.fail(
            case,
            f"the loss should be a 0-d tensor that backward() can run through, but the function "
            f"returned a {seen['type']}{number}: it looks like .item(), float() or numpy was used.",
        )
    loss = seen["loss"]
    if torch.is_tensor(loss) and loss.numel() == 1 and not torch.isfinite(loss).all():
        t.fail(
            case,
            f"the loss is {float(loss)}: it looks like log was taken of disc's raw output. disc "
            "returns logits (any real number), not probabilities: use "
            "F.binary_cross_entropy_with_logits, or log(sigmoid(x)) written stably.",
        )
    t.compare(case, "loss", loss, expected, mistakes=mistakes)


def _disc_loss_mistakes(disc: nn.Module, a: Tensor, b: Tensor, fake: Tensor) -> list:
    pr, pf = _scores(disc, a, b), _scores(disc, a, fake)
    n = pr.shape[0]
    return [
        (
            "the labels are swapped: the real pair (real_a, real_b) gets the label 1 and the fake "
            "pair (real_a, fake_b) the label 0.",
            lambda: 0.5 * (_bce(pr, 0.0) + _bce(pf, 1.0)),
        ),
        (
            "the pair was stacked as (b, a); pix2pix puts the input image first: "
            "torch.cat([real_a, b], dim=1).",
            lambda: (
                0.5
                * (_bce(_scores(disc, a, b, "ba"), 1.0) + _bce(_scores(disc, a, fake, "ba"), 0.0))
            ),
        ),
        (
            "the factor 0.5 is missing: pix2pix halves the discriminator's loss, "
            "0.5 * (real term + fake term), which slows D down relative to G.",
            lambda: _bce(pr, 1.0) + _bce(pf, 0.0),
        ),
        (
            "the sigmoid was applied twice: disc returns logits, and "
            "binary_cross_entropy_with_logits applies the sigmoid itself. Pass it the logits.",
            lambda: 0.5 * (_bce(torch.sigmoid(pr), 1.0) + _bce(torch.sigmoid(pf), 0.0)),
        ),
        (
            "the cross-entropies were summed over the patches and the batch instead of averaged: "
            "each term is the mean over every patch of every image.",
            lambda: 0.5 * (_bce(pr, 1.0) + _bce(pf, 0.0)) * pr.numel(),
        ),
        (
            "the cross-entropies were summed over each image's patches and averaged over the batch: "
            "average over the patches too.",
            lambda: 0.5 * (_bce(pr, 1.0) + _bce(pf, 0.0)) * pr.numel() / n,
        ),
        (
            "this is the least-squares GAN loss (LSGAN, squared error against 1 and 0); the exercise "
            "uses pix2pix's vanilla GAN loss, binary cross-entropy with logits.",
            lambda: 0.5 * (((pr - 1) ** 2).mean() + (pf**2).mean()),
        ),
        (
            "the real label was smoothed to 0.9 (one-sided label smoothing); pix2pix uses 1.",
            lambda: 0.5 * (_bce(pr, 0.9) + _bce(pf, 0.0)),
        ),
        ("the fake pair's term is missing.", lambda: 0.5 * _bce(pr, 1.0)),
        ("the fake pair's term is missing.", lambda: _bce(pr, 1.0)),
        ("the real pair's term is missing.", lambda: 0.5 * _bce(pf, 0.0)),
        ("the real pair's term is missing.", lambda: _bce(pf, 0.0)),
        (
            "the pair given to disc for the fake term is (real_a, real_b), so both terms score the "
            "real pair; the fake term scores torch.cat([real_a, fake_b.detach()], dim=1).",
            lambda: 0.5 * (_bce(pr, 1.0) + _bce(pr, 0.0)),
        ),
    ]


def _reference_disc_gradients(
    disc: nn.Module, a: Tensor, b: Tensor, fake: Tensor, terms: str = "both"
) -> Tensor:
    pr, pf = _scores(disc, a, b), _scores(disc, a, fake.detach())
    loss = {"both": 0.5 * (_bce(pr, 1.0) + _bce(pf, 0.0)), "real": 0.5 * _bce(pr, 1.0)}[terms]
    grads = torch.autograd.grad(loss, list(disc.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@exercise(
    "pix2pix_discriminator_loss",
    chapter=CHAPTER,
    signature="(disc, real_a, real_b, fake_b) -> 0-d Tensor",
    summary="0.5*(BCE-with-logits(disc(cat[a, b]), 1) + BCE-with-logits(disc(cat[a, fake_b.detach()]), 0)), "
    "means over every patch; no gradient reaches fake_b",
    reference=ref_pix2pix_discriminator_loss,
)
def check_pix2pix_discriminator_loss(t: Tester) -> None:
    """Value, no gradient into fake_b, and the gradient in disc's weights, on 1- and 3-channel inputs."""
    for case, (weights, a, b, fake), _ in _loss_cases(t, with_lambda=False):
        seen = t.probe(case, probe_loss, weights, a, b, fake)
        dtype = a.dtype
        w64 = {k: v.double() for k, v in weights.items()}
        disc = _build(ProbeDiscriminator, w64, a.shape[1], b.shape[1])
        a64, b64, f64 = a.double(), b.double(), fake.double()
        with torch.no_grad():
            expected = ref_pix2pix_discriminator_loss(disc, a64, b64, f64).to(dtype)
            mistakes = _disc_loss_mistakes(disc, a64, b64, f64)
        _judge_loss_value(t, case, seen, expected, mistakes)
        d_fake = seen["d_fake"]
        if d_fake is not None and float(d_fake.abs().max()) > 0:
            t.fail(
                case,
                "the loss sends a gradient into fake_b (max |d loss / d fake_b| = "
                f"{float(d_fake.abs().max()):.3g}): the fake image was not detached. In the "
                "discriminator's step only D learns; score the fake pair as "
                "disc(torch.cat([real_a, fake_b.detach()], dim=1)), or loss_d.backward() runs "
                "through the generator as well.",
            )
        if not seen["requires_grad"] or "d_disc" not in seen:
            t.fail(
                case,
                "the loss has the right value but no gradient reaches disc's parameters (it does "
                "not require grad): it looks like it was computed under torch.no_grad() or detached.",
            )
        want = _reference_disc_gradients(disc, a64, b64, f64).to(dtype)
        t.compare(
            case,
            "d loss / d disc's parameters",
            seen["d_disc"],
            want,
            mistakes=[
                (
                    "the fake pair's score carries no gradient to disc (its output was detached, or "
                    "computed under torch.no_grad()): detach the fake image, fake_b.detach(), not "
                    "the discriminator's output, so that D still learns from the fake term.",
                    partial(_reference_disc_gradients, disc, a64, b64, f64, "real"),
                )
            ],
        )


def _gen_loss_mistakes(
    disc: nn.Module, a: Tensor, b: Tensor, fake: Tensor, lam: float
) -> list[tuple[str, Callable[[], Tensor]]]:
    pf = _scores(disc, a, fake)
    gan, l1 = _bce(pf, 1.0), (fake - b).abs().mean()
    out = [
        (
            "the L1 term compares fake_b with real_a, the input; it measures the distance to the "
            "target: mean |fake_b - real_b|.",
            lambda: gan + lam * (fake - a).abs().mean(),
        ),
        (
            "the GAN term uses the label 0, the discriminator's label for fakes. The generator "
            "wants its fake called real: BCE(disc(cat[real_a, fake_b]), 1).",
            lambda: _bce(pf, 0.0) + lam * l1,
        ),
        (
            "this is the saturating minimax form, minimising log(1 - D(a, G(a))). pix2pix (like "
            "Goodfellow et al.) minimises -log D(a, G(a)), BCE with the label 1, whose gradient does "
            "not vanish while D rejects the fakes.",
            lambda: -_bce(pf, 0.0) + lam * l1,
        ),
        (
            "the GAN term scores the real pair (real_a, real_b); the generator's loss scores its "
            "fake: disc(torch.cat([real_a, fake_b], dim=1)).",
            lambda: _bce(_scores(disc, a, b), 1.0) + lam * l1,
        ),
        (
            "the pair was stacked as (fake_b, a); pix2pix puts the input image first: "
            "torch.cat([real_a, fake_b], dim=1).",
            lambda: _bce(_scores(disc, a, fake, "ba"), 1.0) + lam * l1,
        ),
        (
            "the reconstruction term is squared (L2, MSE); pix2pix uses L1, mean |fake_b - real_b|, "
            "which blurs less.",
            lambda: gan + lam * ((fake - b) ** 2).mean(),
        ),
        (
            "the L1 term was summed over every entry; it is the mean.",
            lambda: gan + lam * (fake - b).abs().sum(),
        ),
        (
            "the sigmoid was applied twice: disc returns logits, and "
            "binary_cross_entropy_with_logits applies the sigmoid itself.",
            lambda: _bce(torch.sigmoid(pf), 1.0) + lam * l1,
        ),
        (
            "this is the least-squares GAN term (LSGAN, (D - 1)^2); the exercise uses pix2pix's "
            "vanilla GAN loss, binary cross-entropy with logits.",
            lambda: ((pf - 1) ** 2).mean() + lam * l1,
        ),
        (
            "the GAN term was halved; only the discriminator's loss carries the factor 0.5.",
            lambda: 0.5 * gan + lam * l1,
        ),
    ]
    if lam != 0.0:
        out += [
            ("the L1 term is missing.", lambda: gan),
            ("the GAN term is missing.", lambda: lam * l1),
        ]
    if lam not in (0.0, 1.0):
        out += [
            (
                "lambda_l1 is missing: the L1 term is weighted by lambda_l1.",
                lambda: gan + l1,
            ),
            (
                "lambda_l1 multiplies the GAN term; it weights the L1 term.",
                lambda: lam * gan + l1,
            ),
            (
                "lambda_l1 multiplies the whole loss; it weights the L1 term only.",
                lambda: lam * (gan + l1),
            ),
        ]
    if lam != 100.0:
        out.append(
            (
                "the default lambda_l1=100 was used instead of the lambda_l1 passed in.",
                lambda: gan + 100.0 * l1,
            )
        )
    return out


@exercise(
    "pix2pix_generator_loss",
    chapter=CHAPTER,
    signature="(disc, real_a, real_b, fake_b, lambda_l1=100.0) -> 0-d Tensor",
    summary="BCE-with-logits(disc(cat[a, fake_b]), 1) + lambda_l1 * mean|fake_b - real_b|; "
    "differentiable in fake_b",
    reference=ref_pix2pix_generator_loss,
)
def check_pix2pix_generator_loss(t: Tester) -> None:
    """Value and d loss / d fake_b (the generator's gradient), for lambda_l1 in 0, 1, 10, 100."""
    for case, (weights, a, b, fake), kwargs in _loss_cases(t, with_lambda=True):
        lam = kwargs.get("lambda_l1", 100.0)
        seen = t.probe(case, probe_loss, weights, a, b, fake, **kwargs)
        dtype = a.dtype
        w64 = {k: v.double() for k, v in weights.items()}
        disc = _build(ProbeDiscriminator, w64, a.shape[1], b.shape[1])
        a64, b64 = a.double(), b.double()
        f64 = fake.double().requires_grad_(True)
        loss = ref_pix2pix_generator_loss(disc, a64, b64, f64, lam)
        (want,) = torch.autograd.grad(loss, f64)
        with torch.no_grad():
            mistakes = _gen_loss_mistakes(disc, a64, b64, f64.detach(), lam)
        _judge_loss_value(t, case, seen, loss.detach().to(dtype), mistakes)
        d_fake = seen["d_fake"]
        if not seen["requires_grad"] or d_fake is None or float(d_fake.abs().max()) == 0:
            t.fail(
                case,
                "the loss has the right value but no gradient flows to fake_b: it looks like the "
                "fake image was detached (.detach(), torch.no_grad() or .item()). The generator "
                "learns through this loss, so it must be differentiable in fake_b.",
            )
        t.compare(case, "d loss / d fake_b", d_fake, want.to(dtype))


# ---- the training step -------------------------------------------------------------------------
def _optimizer(module: nn.Module, setting: dict[str, Any]) -> torch.optim.Optimizer:
    if setting["kind"] == "adam":
        return torch.optim.Adam(module.parameters(), lr=setting["lr"], betas=(0.5, 0.999))
    return torch.optim.SGD(module.parameters(), lr=setting["lr"], momentum=setting["momentum"])


def probe_train_step(
    fn: Callable[..., Any],
    gen_weights: dict[str, Tensor],
    disc_weights: dict[str, Tensor],
    opt_g_setting: dict[str, Any],
    opt_d_setting: dict[str, Any],
    real_a: list[Tensor],
    real_b: list[Tensor],
    **kwargs: Any,
) -> dict[str, Any]:
    """Run the learner's step once per batch on fresh networks; the parameters after each step,
    what the step returned, and a trace of the forward passes, gradients and optimizer steps."""
    ca, cb = real_a[0].shape[1], real_b[0].shape[1]
    gen = _build(ProbeGenerator, gen_weights, ca, cb)
    disc = _build(ProbeDiscriminator, disc_weights, ca, cb)
    opt_g, opt_d = _optimizer(gen, opt_g_setting), _optimizer(disc, opt_d_setting)
    trace: list[str] = []
    gen.trace = disc.trace = trace  # in forward itself, so that gen.forward(a) is seen too
    opt_g.register_step_post_hook(lambda *_: trace.append("opt_g.step"))
    opt_d.register_step_post_hook(lambda *_: trace.append("opt_d.step"))
    seen: dict[str, Any] = {"returned": [], "gen": [], "disc": [], "trace": trace}
    for step, (a, b) in enumerate(zip(real_a, real_b, strict=True), 1):
        trace.append("call")
        try:
            out = fn(gen, disc, opt_g, opt_d, a, b, **kwargs)
        except RuntimeError as err:
            key = _known_error(err)
            if not key:
                raise
            seen.update(error=key, step=step)
            return seen
        if isinstance(out, tuple | list):
            seen["returned"].append(
                [_number(x) if _number(x) is not None else type(x).__name__ for x in out]
            )
        else:
            seen["returned"].append(type(out).__name__)
        seen["gen"].append(_flat(gen))
        seen["disc"].append(_flat(disc))
    return seen


def _step_variant(
    *,
    zero_d: bool = True,
    zero_g: bool = True,
    old_disc: bool = False,
    lam_default: bool = False,
    gan_only: bool = False,
    freeze: bool = False,
) -> Callable[..., tuple[float, float]]:
    """The reference step with one mistake: a missing zero_grad, the G loss scored by the old D
    with both backward passes before the steps, lambda_l1 not passed on, or other return values."""

    def step(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):  # noqa: ANN001, ANN202
        lam = 100.0 if lam_default else lambda_l1
        fake = gen(real_a)
        if old_disc:
            opt_d.zero_grad()
            opt_g.zero_grad()
            loss_d = ref_pix2pix_discriminator_loss(disc, real_a, real_b, fake)
            loss_g = ref_pix2pix_generator_loss(disc, real_a, real_b, fake, lam)
            loss_d.backward()
            loss_g.backward()
            opt_d.step()
            opt_g.step()
            return loss_d.item(), loss_g.item()
        if zero_d:
            opt_d.zero_grad()
        loss_d = ref_pix2pix_discriminator_loss(disc, real_a, real_b, fake)
        loss_d.backward()
        opt_d.step()
        disc.requires_grad_(not freeze)
        if zero_g:
            opt_g.zero_grad()
        pred = disc(torch.cat([real_a, fake], dim=1))
        gan = _bce(pred, 1.0)
        loss_g = gan + lam * (fake - real_b).abs().mean()
        loss_g.backward()
        opt_g.step()
        disc.requires_grad_(True)
        return loss_d.item(), (gan if gan_only else loss_g).item()

    return step


#: Mistaken steps whose parameters the battery computes, with the sentence each earns.
STEP_MISTAKES = (
    (
        {"zero_d": False},
        "opt_d.zero_grad() is missing (or comes before the wrong backward): backward() adds to "
        ".grad, so D's step also used the gradients left from earlier backward passes. Call "
        "opt_d.zero_grad() just before loss_d.backward().",
    ),
    (
        {"zero_d": False, "freeze": True},
        "opt_d.zero_grad() is missing (or comes before the wrong backward): backward() adds to "
        ".grad, so D's step also used the gradients of the previous step. Call "
        "opt_d.zero_grad() just before loss_d.backward().",
    ),
    (
        {"zero_g": False},
        "opt_g.zero_grad() is missing (or comes before the wrong backward): backward() adds to "
        ".grad, so G's step also used the gradients of the previous step. Call opt_g.zero_grad() "
        "just before loss_g.backward().",
    ),
    (
        {"zero_d": False, "zero_g": False},
        "zero_grad() is missing for both optimizers: backward() adds to .grad, so every step also "
        "used the gradients of the steps before it.",
    ),
    (
        {"old_disc": True},
        "the generator's loss was computed with the discriminator from before its update, and both "
        "backward passes ran before the steps (so D's gradient also held the G loss's). pix2pix "
        "steps D first, then scores the fake again with the updated D for the generator's loss.",
    ),
    (
        {"lam_default": True},
        "lambda_l1 was not passed on to the generator's loss: its default, 100, was used.",
    ),
)


def _step_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    settings = [
        (
            "SGD(lr=0.05)",
            {"kind": "sgd", "lr": 0.05, "momentum": 0.0},
            2,
            1,
            3,
            torch.float64,
            {"lambda_l1": 10.0},
        ),
        (
            "Adam(lr=0.01, betas=(0.5, 0.999))",
            {"kind": "adam", "lr": 0.01},
            3,
            3,
            3,
            torch.float64,
            {},
        ),
        (
            "SGD(lr=0.02, momentum=0.5)",
            {"kind": "sgd", "lr": 0.02, "momentum": 0.5},
            2,
            2,
            3,
            torch.float32,
            {"lambda_l1": 5.0},
        ),
    ]
    cases = []
    steps = 2
    for opt_name, setting, n, ca, cb, dtype, kwargs in settings:
        gw = _random_weights(t, ProbeGenerator, ca, cb, dtype)
        dw = _random_weights(t, ProbeDiscriminator, ca, cb, dtype)
        batches_a = [torch.sign(t.randn(n, ca, 6, 6)).to(dtype) for _ in range(steps)]
        batches_b = [torch.tanh(t.randn(n, cb, 6, 6, scale=1.5)).to(dtype) for _ in range(steps)]
        lam = f"lambda_l1={kwargs['lambda_l1']}" if kwargs else "default lambda_l1"
        case = (
            f"{opt_name} for G and D, {steps} steps on batches a {tuple(batches_a[0].shape)}, "
            f"b {tuple(batches_b[0].shape)} {str(dtype).replace('torch.', '')}, {lam}"
        )
        cases.append((case, (gw, dw, setting, dict(setting), batches_a, batches_b), kwargs))
    return cases


def _events_of_step(trace: list[str], step: int) -> list[str]:
    calls, current = [], None
    for event in trace:
        if event == "call":
            current = []
            calls.append(current)
        elif current is not None:
            current.append(event)
    return calls[step - 1] if step <= len(calls) else []


def _judge_order(t: Tester, case: str, seen: dict[str, Any], steps: int) -> None:
    """One D step then one G step, a single gradient into G (from its own loss), per call."""
    for step in range(1, steps + 1):
        events = _events_of_step(seen["trace"], step)
        at = f"at step {step}, "
        for name, role in (("opt_d", "discriminator"), ("opt_g", "generator")):
            count = events.count(f"{name}.step")
            if count != 1:
                extra = (
                    " It looks like D was updated again during the generator's step; only "
                    "opt_g.step() runs there."
                    if name == "opt_d" and count > 1
                    else ""
                )
                t.fail(
                    case,
                    f"{at}{name}.step() was called {count} times; one training step updates the "
                    f"{role} exactly once.{extra}",
                )
        if events.index("opt_g.step") < events.index("opt_d.step"):
            t.fail(
                case,
                f"{at}the generator was updated before the discriminator. pix2pix updates D first "
                "(on the detached fake), then G against the updated D.",
            )
        arrivals = events.count(GRAD_INTO_GEN)
        if arrivals > 1:
            t.fail(
                case,
                f"{at}a gradient reached the generator's output {arrivals} times: the fake was not "
                "detached in the discriminator's loss, so loss_d.backward() also ran through G (and "
                "added to G's gradients unless they were zeroed in between). Use fake_b.detach() in "
                "the D step.",
            )
        if arrivals == 0:
            t.fail(
                case,
                f"{at}no gradient reached the generator's output: its loss was computed on a "
                "detached fake (or under torch.no_grad()), so G cannot learn.",
            )


def _judge_step_result(
    t: Tester, case: str, seen: dict, want: dict, args: tuple, kwargs: dict, steps: int
) -> None:
    dtype = args[0]["conv1.weight"].dtype
    cache: dict[int, dict] = {}

    def variant(i: int) -> dict:
        if i not in cache:
            cache[i] = probe_train_step(_step_variant(**STEP_MISTAKES[i][0]), *args, **kwargs)
        return cache[i]

    for step in range(1, steps + 1):
        returned = seen["returned"][step - 1]
        if (
            isinstance(returned, str)
            or len(returned) != 2
            or any(isinstance(x, str) for x in returned)
        ):
            if isinstance(returned, str):
                got = f"a {returned}"
            elif len(returned) != 2:
                got = f"a sequence of {len(returned)}"
            else:
                got = (
                    "(" + ", ".join(x if isinstance(x, str) else "a number" for x in returned) + ")"
                )
            t.fail(
                case,
                f"at step {step}, the step should return (loss_d, loss_g), two numbers, but it "
                f"returned {got}.",
            )
        events = _events_of_step(seen["trace"], step)
        d_step = events.index("opt_d.step")
        scored_after = DISC_ON_LIVE_FAKE in events[d_step:]
        for net in ("disc", "gen"):
            got = seen[net][step - 1]
            before = (
                seen[net][step - 2]
                if step > 1
                else torch.cat([v.reshape(-1) for v in args[0 if net == "gen" else 1].values()])
            )
            expected = want[net][step - 1]
            rtol, atol = t.tolerances(dtype, float(expected.abs().max()))
            right = torch.allclose(got, expected, rtol=rtol * 10, atol=atol * 10)
            if not right and torch.equal(got, before):
                t.fail(
                    case,
                    f"at step {step}, {net}'s parameters did not change. It looks like its "
                    "optimizer's zero_grad() ran between backward() and step(), or its step was "
                    "never reached.",
                )
            if not right and net == "gen" and not scored_after:
                t.fail(
                    case,
                    f"at step {step}, the generator's parameters are wrong, and the fake was "
                    "scored for its loss only before opt_d.step(): the generator learned from the "
                    "discriminator before its update. Compute the generator's loss after the D "
                    "step, as pix2pix does.",
                )
            mistakes = [
                (sentence, partial(_variant_params, variant, i, net, step))
                for i, (_, sentence) in enumerate(STEP_MISTAKES)
            ]
            t.compare(
                case,
                f"{net}'s parameters after step {step}",
                got,
                expected,
                rtol=rtol * 10,
                atol=atol * 10,
                mistakes=mistakes,
                generic_hints=False,
            )
        loss_d, loss_g = (torch.tensor(x, dtype=torch.float64) for x in returned)
        want_d, want_g = (torch.tensor(x, dtype=torch.float64) for x in want["returned"][step - 1])
        rtol, atol = t.tolerances(dtype)
        swapped = [
            ("the two losses are returned in the wrong order; return (loss_d, loss_g).", want_g)
        ]
        t.compare(
            case,
            f"loss_d returned at step {step}",
            loss_d,
            want_d,
            rtol=rtol * 10,
            mistakes=swapped,
        )
        t.compare(
            case,
            f"loss_g returned at step {step}",
            loss_g,
            want_g,
            rtol=rtol * 10,
            mistakes=[
                (
                    "the two losses are returned in the wrong order; return (loss_d, loss_g).",
                    want_d,
                ),
                (
                    "loss_g is the GAN term alone; return the whole generator loss, GAN term plus "
                    "lambda_l1 times L1.",
                    partial(_gan_only, args, kwargs, step),
                ),
            ],
        )


def _gan_only(args: tuple, kwargs: dict, step: int) -> Tensor:
    """The GAN term of the generator's loss at ``step``, as the reference step computes it."""
    seen = probe_train_step(_step_variant(gan_only=True), *args, **kwargs)
    return torch.tensor(seen["returned"][step - 1][1], dtype=torch.float64)


def _variant_params(variant: Callable[[int], dict], i: int, net: str, step: int) -> Tensor:
    return variant(i)[net][step - 1]


@exercise(
    "pix2pix_train_step",
    chapter=CHAPTER,
    signature="(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0) -> (loss_d float, loss_g float)",
    summary="one pix2pix step: fake = gen(a); D step on the detached fake; then G step (GAN + "
    "lambda_l1 L1) scored by the updated D; returns both losses",
    reference=ref_pix2pix_train_step,
)
def check_pix2pix_train_step(t: Tester) -> None:
    """Parameters of G and D after each of two steps, the returned losses, and the order of what ran."""
    load_optimizer_machinery()
    for case, args, kwargs in _step_cases(t):
        seen = t.probe(case, probe_train_step, *args, **kwargs)
        if "error" in seen:
            t.fail(case, f"at step {seen['step']}, {KNOWN_ERRORS[seen['error']]}")
        want = probe_train_step(ref_pix2pix_train_step, *args, **kwargs)
        steps = len(args[4])
        _judge_order(t, case, seen, steps)
        _judge_step_result(t, case, seen, want, args, kwargs, steps)
