"""Calibration statistics accumulated from layer inputs, always in fp32.

x [T, K] (any float dtype) -> sum of squares per channel [K] (Wanda) and X^T X [K, K]
(SparseGPT's Hessian before its 2/n scale).
"""

from __future__ import annotations

import torch


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def accumulate_sq_sum(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [K] fp32 += sum over tokens of x**2; x [..., K]."""
    tokens = _as_tokens(x).float()
    out.add_(tokens.square().sum(dim=0))
    return out


def accumulate_gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [K, K] fp32 += x^T x; x [..., K]."""
    tokens = _as_tokens(x).float()
    out.addmm_(tokens.T, tokens)
    return out
