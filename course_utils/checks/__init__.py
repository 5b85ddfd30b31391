"""Check batteries, one module per chapter; importing this package registers them all."""

from . import ch00_gradient_checking, ch01_logits_softmax_cross_entropy  # noqa: F401
