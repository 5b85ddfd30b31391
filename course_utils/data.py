"""Small data sets that ship with a package, as tensors: no downloads, fixed splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as a stratified (train, test) split."""
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # scikit-learn is an optional extra
        raise ImportError(
            "This chapter needs scikit-learn: pip install 'course-utils[chapters]'"
        ) from err
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    return Split(x[idx_train], y[idx_train]), Split(x[idx_test], y[idx_test])
