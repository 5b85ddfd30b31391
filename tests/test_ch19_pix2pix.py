"""Chapter 19 batteries: correct pix2pix losses and steps in several styles pass, planted mistakes are named.

Styles: the references, softplus and log-sigmoid forms of the cross-entropy, nn.BCEWithLogitsLoss
and nn.L1Loss modules, sigmoid then F.binary_cross_entropy, one discriminator call on the real and
fake pairs stacked along the batch, a per-image loop; steps written as pix2pix's
optimize_parameters (set_requires_grad, module zero_grad), with a fake recomputed under no_grad,
with both gradients zeroed at the start, returning 0-d tensors. Mistakes: the ones the issue lists
(no detach, swapped labels, an unconditional D, missing 0.5, a double sigmoid, logits fed to
F.binary_cross_entropy, sums for means, L1 on the wrong pair, label 0 or the saturating form for G,
a detached fake, lambda misplaced, L2, G before D, missing zero_grad, the old D, D stepped twice)
and others (LSGAN, a frozen D never unfrozen, lambda not passed on, losses swapped), each named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from check_times import report_check_seconds
from torch import nn

import course_utils as cu
from course_utils.checks import ch19_pix2pix as ch19

SEEDS = range(6)
MISTAKE_SEEDS = (0, 3)
D_LOSS, G_LOSS, STEP = "pix2pix_discriminator_loss", "pix2pix_generator_loss", "pix2pix_train_step"


# =====================================================================================
# Correct implementations
# =====================================================================================
def d_loss_softplus(disc, real_a, real_b, fake_b):
    """BCE with logits written as softplus: -log sigmoid(x) = softplus(-x)."""
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake_b.detach()], 1))
    return (F.softplus(-pr).mean() + F.softplus(pf).mean()) / 2


def d_loss_one_call(disc, real_a, real_b, fake_b):
    """Real and fake pairs stacked along the batch, one disc call, nn.BCEWithLogitsLoss."""
    pairs = torch.cat([torch.cat([real_a, real_b], 1), torch.cat([real_a, fake_b.detach()], 1)], 0)
    pred = disc(pairs)
    pr, pf = pred.chunk(2)
    crit = nn.BCEWithLogitsLoss()
    return 0.5 * crit(pr, torch.ones_like(pr)) + 0.5 * crit(pf, torch.zeros_like(pf))


def d_loss_probabilities(disc, real_a, real_b, fake_b):
    """sigmoid, then F.binary_cross_entropy on probabilities (fine for moderate logits)."""
    with torch.no_grad():
        fake = fake_b.clone()
    p_real = torch.sigmoid(disc(torch.cat([real_a, real_b], 1)))
    p_fake = torch.sigmoid(disc(torch.cat([real_a, fake], 1)))
    real_term = F.binary_cross_entropy(p_real, torch.ones_like(p_real))
    fake_term = F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake))
    return 0.5 * (real_term + fake_term)


def d_loss_per_image(disc, real_a, real_b, fake_b):
    """A loop over the images, log-sigmoid form, averaged at the end."""
    terms = []
    for i in range(real_a.shape[0]):
        a, b, f = real_a[i : i + 1], real_b[i : i + 1], fake_b[i : i + 1].detach()
        pr, pf = disc(torch.cat([a, b], 1)), disc(torch.cat([a, f], 1))
        terms.append(-(F.logsigmoid(pr).mean() + F.logsigmoid(-pf).mean()) / 2)
    return torch.stack(terms).mean()


def g_loss_softplus(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    """softplus for the GAN term, F.l1_loss for the L1 term."""
    pf = disc(torch.cat([real_a, fake_b], 1))
    return F.softplus(-pf).mean() + lambda_l1 * F.l1_loss(fake_b, real_b)


def g_loss_modules(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    """nn.BCEWithLogitsLoss and nn.L1Loss, D frozen while G's loss is built (pix2pix style)."""
    disc.requires_grad_(False)
    pf = disc(torch.cat((real_a, fake_b), dim=1))
    loss = nn.BCEWithLogitsLoss()(pf, torch.ones_like(pf)) + nn.L1Loss()(fake_b, real_b) * lambda_l1
    disc.requires_grad_(True)
    return loss


def g_loss_probabilities(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    """-mean log sigmoid(x) through probabilities, the L1 term as a sum over numel."""
    p = torch.sigmoid(disc(torch.cat([real_a, fake_b], 1)))
    return -torch.log(p).mean() + lambda_l1 * (fake_b - real_b).abs().sum() / fake_b.numel()


def step_pix2pix_style(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    """pix2pix's optimize_parameters: set_requires_grad, module zero_grad, the learner's losses."""
    fake = gen(real_a)
    disc.requires_grad_(True)
    disc.zero_grad()
    loss_d = d_loss_softplus(disc, real_a, real_b, fake)
    loss_d.backward()
    opt_d.step()
    for p in disc.parameters():
        p.requires_grad = False
    gen.zero_grad()
    loss_g = g_loss_softplus(disc, real_a, real_b, fake, lambda_l1)
    loss_g.backward()
    opt_g.step()
    return float(loss_d), float(loss_g)


def step_recomputed_fake(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    """The fake for D made under no_grad, a fresh one for G by gen.forward; both zeroed at the start."""
    opt_d.zero_grad()
    opt_g.zero_grad(set_to_none=False)
    with torch.no_grad():
        fake_for_d = gen(real_a)
    loss_d = d_loss_one_call(disc, real_a, real_b, fake_for_d)
    loss_d.backward()
    opt_d.step()
    fake = gen.forward(real_a)  # no hooks run this way: the battery must still see the step
    loss_g = g_loss_modules(disc, real_a, real_b, fake, lambda_l1)
    loss_g.backward()
    opt_g.step()
    return loss_d.detach(), loss_g.detach()


CORRECT = {
    D_LOSS: [d_loss_softplus, d_loss_one_call, d_loss_probabilities, d_loss_per_image],
    G_LOSS: [g_loss_softplus, g_loss_modules, g_loss_probabilities],
    STEP: [step_pix2pix_style, step_recomputed_fake],
}
PAIRS = [(e, f) for e, fs in CORRECT.items() for f in fs]


@pytest.mark.parametrize(("exercise_id", "fn"), PAIRS, ids=[f.__name__ for _, f in PAIRS])
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        cu.check(exercise_id, fn, strict=True, seed=seed)


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in SEEDS:
        cu.check(exercise_id, cu.reference(exercise_id), strict=True, seed=seed)


def test_references_agree_with_hand_computed_numbers():
    # A "discriminator" that returns its input's first channel: the logits are known numbers.
    def first_channel(ab):
        return ab[:, :1]

    a = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    b = torch.tensor([[[[0.5, -0.5]]]], dtype=torch.float64)
    fake = torch.tensor([[[[0.25, 0.75]]]], dtype=torch.float64)
    # disc sees a = 0 everywhere, so both pairs get the logit 0: BCE(0, 1) = BCE(0, 0) = log 2.
    loss_d = ch19.ref_pix2pix_discriminator_loss(first_channel, a, b, fake)
    assert torch.isclose(loss_d, torch.tensor(2.0).log().double())
    loss_g = ch19.ref_pix2pix_generator_loss(first_channel, a, b, fake, lambda_l1=10.0)
    assert torch.isclose(loss_g, torch.tensor(2.0).log().double() + 10.0 * (0.25 + 1.25) / 2)


# =====================================================================================
# Planted mistakes in the losses, each with the words its message must contain
# =====================================================================================
def _d(*, labels=(1.0, 0.0), order="ab", half=0.5, detach=True, reduce="mean", squash=False):
    def fn(disc, real_a, real_b, fake_b):
        fake = fake_b.detach() if detach else fake_b

        def score(x):
            pair = [real_a, x] if order == "ab" else [x, real_a]
            out = disc(torch.cat(pair, 1))
            return torch.sigmoid(out) if squash else out

        pr, pf = score(real_b), score(fake)
        lr = F.binary_cross_entropy_with_logits(
            pr, torch.full_like(pr, labels[0]), reduction=reduce
        )
        lf = F.binary_cross_entropy_with_logits(
            pf, torch.full_like(pf, labels[1]), reduction=reduce
        )
        return half * (lr + lf)

    return fn


def d_unconditional(disc, real_a, real_b, fake_b):
    pr, pf = disc(real_b), disc(fake_b.detach())
    return 0.5 * (F.softplus(-pr).mean() + F.softplus(pf).mean())


def d_bce_on_logits(disc, real_a, real_b, fake_b):
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake_b.detach()], 1))
    return 0.5 * (
        F.binary_cross_entropy(pr, torch.ones_like(pr))
        + F.binary_cross_entropy(pf, torch.zeros_like(pf))
    )


def d_log_of_logits(disc, real_a, real_b, fake_b):
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake_b.detach()], 1))
    return -0.5 * (torch.log(pr).mean() + torch.log(1 - pf).mean())


def d_lsgan(disc, real_a, real_b, fake_b):
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake_b.detach()], 1))
    return 0.5 * (F.mse_loss(pr, torch.ones_like(pr)) + F.mse_loss(pf, torch.zeros_like(pf)))


def d_fake_score_no_grad(disc, real_a, real_b, fake_b):
    pr = disc(torch.cat([real_a, real_b], 1))
    with torch.no_grad():
        pf = disc(torch.cat([real_a, fake_b], 1))
    return 0.5 * (F.softplus(-pr).mean() + F.softplus(pf).mean())


def d_item(disc, real_a, real_b, fake_b):
    return ch19.ref_pix2pix_discriminator_loss(disc, real_a, real_b, fake_b).item()


def d_per_image_sum(disc, real_a, real_b, fake_b):
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake_b.detach()], 1))
    return 0.5 * (F.softplus(-pr).sum((1, 2, 3)).mean() + F.softplus(pf).sum((1, 2, 3)).mean())


def d_in_place(disc, real_a, real_b, fake_b):
    loss = ch19.ref_pix2pix_discriminator_loss(disc, real_a, real_b, fake_b)
    real_a.mul_(1.0).add_(1.0)
    return loss


D_MISTAKES = [
    (_d(labels=(0.0, 1.0)), r"`loss` is wrong.*labels are swapped"),
    (_d(order="ba"), r"`loss` is wrong.*stacked as \(b, a\)"),
    (_d(half=1.0), r"`loss` is wrong.*factor 0\.5 is missing"),
    (_d(detach=False), r"sends a gradient into fake_b.*not detached"),
    (_d(reduce="sum"), r"`loss` is wrong.*summed over the patches and the batch"),
    (d_per_image_sum, r"`loss` is wrong.*summed over each image's patches"),
    (_d(squash=True), r"`loss` is wrong.*sigmoid was applied twice"),
    (d_unconditional, r"raised ValueError: disc was called on .* one image alone.*unconditional"),
    (d_bce_on_logits, r"F\.binary_cross_entropy was given disc's raw output.*logit"),
    (d_log_of_logits, r"loss is nan.*log was taken of disc's raw output"),
    (d_lsgan, r"`loss` is wrong.*least-squares GAN loss"),
    (d_fake_score_no_grad, r"d loss / d disc's parameters.*fake pair's score carries no gradient"),
    (d_item, r"returned a float .*\.item\(\), float\(\) or numpy"),
    (d_in_place, r"changed its input `real_a` in place"),
]


def _g(*, pair="b", label=1.0, saturating=False, lam="l1", l1="abs", detach=False, half=1.0):
    def fn(disc, real_a, real_b, fake_b, lambda_l1=100.0):
        fake = fake_b.detach() if detach else fake_b
        pf = disc(torch.cat([real_a, fake], 1))
        if saturating:
            gan = -F.binary_cross_entropy_with_logits(pf, torch.zeros_like(pf))
        else:
            gan = F.binary_cross_entropy_with_logits(pf, torch.full_like(pf, label))
        target = real_b if pair == "b" else real_a
        dist = (fake - target).abs() if l1 == "abs" else (fake - target) ** 2
        rec = dist.mean()
        weights = {"l1": (1.0, lambda_l1), "gan": (lambda_l1, 1.0), "none": (1.0, 1.0)}[lam]
        return half * weights[0] * gan + weights[1] * rec

    return fn


def g_item(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    return float(ch19.ref_pix2pix_generator_loss(disc, real_a, real_b, fake_b, lambda_l1))


def g_unconditional(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    pf = disc(fake_b)
    return F.softplus(-pf).mean() + lambda_l1 * (fake_b - real_b).abs().mean()


def g_default_lambda(disc, real_a, real_b, fake_b, lambda_l1=100.0):
    return ch19.ref_pix2pix_generator_loss(disc, real_a, real_b, fake_b)


G_MISTAKES = [
    (_g(pair="a"), r"`loss` is wrong.*L1 term compares fake_b with real_a"),
    (_g(label=0.0), r"`loss` is wrong.*GAN term uses the label 0"),
    (_g(saturating=True), r"`loss` is wrong.*saturating minimax form.*log\(1 - D"),
    (_g(detach=True), r"no gradient flows to fake_b.*detached"),
    (_g(lam="none"), r"`loss` is wrong.*lambda_l1 is missing"),
    (_g(lam="gan"), r"`loss` is wrong.*lambda_l1 multiplies the GAN term"),
    (_g(l1="square"), r"`loss` is wrong.*squared \(L2, MSE\)"),
    (_g(half=0.5), r"`loss` is wrong.*GAN term was halved"),
    (g_item, r"returned a float .*\.item\(\), float\(\) or numpy"),
    (g_unconditional, r"raised ValueError: disc was called on .* unconditional"),
    (g_default_lambda, r"`loss` is wrong.*default lambda_l1=100 was used"),
]


# =====================================================================================
# Planted mistakes in the training step
# =====================================================================================
def _loss_d(disc, real_a, real_b, fake, detach=True):
    pr = disc(torch.cat([real_a, real_b], 1))
    pf = disc(torch.cat([real_a, fake.detach() if detach else fake], 1))
    return 0.5 * (F.softplus(-pr).mean() + F.softplus(pf).mean())


def _loss_g(disc, real_a, real_b, fake, lam):
    pf = disc(torch.cat([real_a, fake], 1))
    return F.softplus(-pf).mean() + lam * (fake - real_b).abs().mean()


def step_no_detach_retained(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    """Both gradients zeroed at the start, then D's loss backpropagated into G as well."""
    opt_d.zero_grad()
    opt_g.zero_grad()
    fake = gen(real_a)
    loss_d = _loss_d(disc, real_a, real_b, fake, detach=False)
    loss_d.backward(retain_graph=True)
    opt_d.step()
    loss_g = _loss_g(disc, real_a, real_b, fake, lambda_l1)
    loss_g.backward()
    opt_g.step()
    return loss_d.item(), loss_g.item()


def _step(
    *,
    zero_d=True,
    zero_g=True,
    freeze=False,
    unfreeze=True,
    lam_default=False,
    twice=False,
    returns="dg",
    zero_late=False,
    g_first=False,
    detach_in_d=True,
    detach_in_g=False,
):
    """pix2pix's step, written as a learner would, with the mistakes the arguments name."""

    def fn(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
        lam = 100.0 if lam_default else lambda_l1
        fake = gen(real_a)
        losses = {}

        def d_step():
            if zero_d:
                opt_d.zero_grad()
            losses["d"] = _loss_d(disc, real_a, real_b, fake, detach=detach_in_d)
            losses["d"].backward()
            if zero_late:
                opt_d.zero_grad()
            opt_d.step()

        def g_step():
            if freeze:
                disc.requires_grad_(False)
            if zero_g:
                opt_g.zero_grad()
            scored = fake.detach() if detach_in_g else fake
            pf = disc(torch.cat([real_a, scored], 1))
            losses["n"] = F.softplus(-pf).mean()
            losses["g"] = losses["n"] + lam * (scored - real_b).abs().mean()
            losses["g"].backward()
            opt_g.step()
            if twice:
                opt_d.step()
            if freeze and unfreeze:
                disc.requires_grad_(True)

        for phase in (g_step, d_step) if g_first else (d_step, g_step):
            phase()
        if returns == "d":
            return losses["d"].item()
        return losses[returns[0]].item(), losses[returns[1]].item()

    return fn


def step_old_disc_in_place(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    fake = gen(real_a)
    loss_d = _loss_d(disc, real_a, real_b, fake)
    loss_g = _loss_g(disc, real_a, real_b, fake, lambda_l1)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d.item(), loss_g.item()


def step_old_disc_both_backward(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    opt_d.zero_grad()
    opt_g.zero_grad()
    fake = gen(real_a)
    loss_d = _loss_d(disc, real_a, real_b, fake)
    loss_g = _loss_g(disc, real_a, real_b, fake, lambda_l1)
    loss_d.backward()
    loss_g.backward()
    opt_d.step()
    opt_g.step()
    return loss_d.item(), loss_g.item()


def step_in_place(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0):
    out = ch19.ref_pix2pix_train_step(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1)
    real_b.zero_()
    return out


STEP_MISTAKES = [
    (_step(g_first=True), r"generator was updated before the discriminator"),
    (_step(detach_in_d=False), r"graph was already freed.*fake image was not detached"),
    (step_no_detach_retained, r"gradient reached the generator's output 2 times.*not detached"),
    (
        _step(zero_d=False),
        r"disc's parameters after step 2` is wrong.*opt_d\.zero_grad\(\) is missing",
    ),
    (
        _step(zero_d=False, freeze=True),
        r"disc's parameters after step 2` is wrong.*opt_d\.zero_grad\(\) is missing",
    ),
    (
        _step(zero_g=False),
        r"gen's parameters after step 2` is wrong.*opt_g\.zero_grad\(\) is missing",
    ),
    (
        _step(zero_d=False, zero_g=False),
        r"parameters after step 2` is wrong.*opt_d\.zero_grad\(\) is missing",
    ),
    (step_old_disc_in_place, r"computed before the discriminator's step"),
    (step_old_disc_both_backward, r"before (its update|opt_d\.step)"),
    (_step(twice=True), r"opt_d\.step\(\) was called 2 times.*updated again"),
    (_step(freeze=True, unfreeze=False), r"at step 2, .*does not require grad.*frozen"),
    (_step(lam_default=True), r"lambda_l1 was not passed on"),
    (_step(zero_late=True), r"disc's parameters did not change.*zero_grad\(\) ran between"),
    (_step(returns="gd"), r"`loss_d returned at step 1` is wrong.*wrong order"),
    (_step(returns="dn"), r"`loss_g returned at step 1` is wrong.*GAN term alone"),
    (_step(returns="d"), r"should return \(loss_d, loss_g\), two numbers, but it returned a float"),
    (_step(detach_in_g=True), r"no gradient reached the generator's output"),
    (step_in_place, r"changed its input `real_b` in place"),
]


MISTAKES = (
    [(D_LOSS, fn, pattern) for fn, pattern in D_MISTAKES]
    + [(G_LOSS, fn, pattern) for fn, pattern in G_MISTAKES]
    + [(STEP, fn, pattern) for fn, pattern in STEP_MISTAKES]
)


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"),
    MISTAKES,
    ids=[f"{e.split('_', 1)[1]}-{i}" for i, (e, _, _) in enumerate(MISTAKES)],
)
def test_planted_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check(exercise_id, fn, strict=True, seed=seed)


def test_the_probes_refuse_a_pair_that_is_not_one():
    disc = ch19.ProbeDiscriminator(1, 3)
    with pytest.raises(ValueError, match=r"one image alone.*unconditional") as info:
        disc(torch.zeros(2, 3, 4, 4))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"stacked along the channels"):
        disc(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"takes one tensor"):
        disc([torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"gen was called on \(2, 3, 4, 4\)"):
        ch19.ProbeGenerator(1, 3)(torch.zeros(2, 3, 4, 4))


def test_the_reference_step_leaves_the_discriminator_trainable():
    gen, disc = ch19.ProbeGenerator(1, 3), ch19.ProbeDiscriminator(1, 3)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    a, b = torch.randn(2, 1, 6, 6), torch.randn(2, 3, 6, 6).tanh()
    loss_d, loss_g = ch19.ref_pix2pix_train_step(gen, disc, opt_g, opt_d, a, b)
    assert isinstance(loss_d, float) and isinstance(loss_g, float)
    assert all(p.requires_grad for p in disc.parameters())


def test_contract_signatures():
    listed = {e.id: e for e in cu.exercises("19")}
    assert set(listed) == set(CORRECT)
    assert listed[D_LOSS].signature == "(disc, real_a, real_b, fake_b) -> 0-d Tensor"
    assert (
        listed[G_LOSS].signature == "(disc, real_a, real_b, fake_b, lambda_l1=100.0) -> 0-d Tensor"
    )
    assert listed[STEP].signature == (
        "(gen, disc, opt_g, opt_d, real_a, real_b, lambda_l1=100.0) -> (loss_d float, loss_g float)"
    )


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(CORRECT, capsys)


# =====================================================================================
# The chapter's own data and training helpers: right shapes, determinism, one-line errors
# =====================================================================================
@pytest.fixture(scope="module")
def chapter():
    """The notebook's cells that define the data (make_pairs) and the two networks, executed."""
    path = Path(__file__).resolve().parents[1] / "solutions" / "19_pix2pix.ipynb"
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    namespace = {"torch": torch, "nn": nn, "F": F}
    for head in ("#: The colour of each kind", "class UNetGenerator"):
        (source,) = [s for s in cells if s.startswith(head)]
        exec(source.split("\ngen_demo")[0], namespace)  # noqa: S102 - the chapter's own cells
    return namespace


def test_make_pairs_shapes_ranges_and_determinism(chapter):
    a, b = chapter["make_pairs"](64, seed=3)
    assert a.shape == (64, 1, 32, 32) and b.shape == (64, 3, 32, 32)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert b.abs().max() <= 0.8 + 1e-6
    a2, b2 = chapter["make_pairs"](64, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(b, chapter["make_pairs"](64, seed=4)[1])
    # Every target pixel is the background, a kind's colour or its dark stripe, and all occur.
    bright = chapter["COLOURS"]
    background = chapter["BACKGROUND"]
    palette = torch.cat([bright, (bright + background) / 2, torch.full((1, 3), background)])
    pixels = b.permute(0, 2, 3, 1).reshape(-1, 3)
    distance, which = torch.cdist(pixels, palette).min(1)
    assert distance.max() < 1e-6
    assert set(which.unique().tolist()) == set(range(7))
    # Outline pixels lie on the filled shapes.
    filled = (b != background).any(1)
    assert bool(filled[a[:, 0] > 0].all())
    # Inside a shape, rows two apart are always on opposite stripes.
    both = filled[:, 2:, :] & filled[:, :-2, :]
    step = (b[:, :, 2:, :] - b[:, :, :-2, :]).abs().sum(1)
    assert torch.allclose(step[both].median(), torch.tensor(1.6))


def test_the_stripe_phase_is_not_in_the_outline(chapter):
    # A shape's first row is bright in 2 of the 4 phases: about half of 512 shapes (a binomial
    # share outside (0.4, 0.6) has probability below 1e-5).
    a, b = chapter["make_pairs"](512, seed=0, max_shapes=1)
    filled = (b != chapter["BACKGROUND"]).any(1)  # (512, 32, 32)
    top = filled.any(2).float().argmax(1)  # first row of the shape in each image
    rows = b[torch.arange(512), :, top]  # (512, 3, 32): that row
    on_top = filled[torch.arange(512), top]  # (512, 32)
    brightness = (rows.sum(1) * on_top).sum(1) / on_top.sum(1)  # +0.8 on a bright stripe, -0.8 dark
    bright_share = float((brightness > 0).float().mean())
    assert 0.4 < bright_share < 0.6, bright_share


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n": 0}, r"n must be a positive whole number of pairs, got 0"),
        ({"n": 2.5}, r"n must be a positive whole number of pairs, got 2\.5"),
        ({"n": 4, "size": 16}, r"size must be a whole number of pixels, at least 20.*got 16"),
        ({"n": 4, "max_shapes": 0}, r"max_shapes must be a positive whole number, got 0"),
    ],
)
def test_make_pairs_refuses_bad_input_in_one_line(chapter, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        chapter["make_pairs"](**kwargs)
    assert "\n" not in str(info.value)


def test_the_networks_shapes_and_receptive_fields(chapter):
    gen = chapter["UNetGenerator"]()
    disc = chapter["PatchDiscriminator"]()
    out = gen(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() < 1
    assert disc(torch.zeros(2, 4, 32, 32)).shape == (2, 1, 14, 14)
    rf = cu.reference("receptive_field")
    paper = chapter["PatchDiscriminator"](6, ndf=64, n_layers=3)
    assert rf(paper.kernels_and_strides()) == 70
    assert rf(disc.kernels_and_strides()) == 16


def test_train_refuses_an_unknown_mode_in_one_line():
    path = Path(__file__).resolve().parents[1] / "solutions" / "19_pix2pix.ipynb"
    (source,) = [
        c.source
        for c in nbformat.read(path, as_version=4).cells
        if c.cell_type == "code" and "\ndef train(" in c.source
    ]
    (node,) = [
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train"
    ]
    namespace = {"torch": torch, "nn": nn}
    exec(compile(ast.Module([node], []), "train", "exec"), namespace)  # noqa: S102
    with pytest.raises(
        ValueError, match=r"mode must be 'l1\+gan', 'gan' or 'l1', got 'l2'"
    ) as info:
        namespace["train"]("l2")
    assert "\n" not in str(info.value)
