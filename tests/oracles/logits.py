"""Comparing our logits with a reference's: transformers' forward pass and the largest difference."""

from __future__ import annotations

import numpy as np
import torch


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """A transformers causal LM's logits for int tokens [B, T], as float32 numpy [B, T, V]."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))
