"""Remat policies: what a rematerialised decoder layer keeps for its backward pass.

A policy names the values kept; everything else the backward pass needs is recomputed from them:
    "matmuls"  every matmul's output (q, k, v after rotary, attention's output and row statistics,
               the residual stream after attention, gate and up) and the layer's input. The rebuilt
               layer recomputes only elementwise work (norms, rotary, SiLU, dropout masks) and LoRA's
               rank-r matmuls: no frozen-weight matmul runs twice.
    "layer"    the layer's input and attention's output and statistics only: the rebuilt layer runs
               every projection again (about 40% more matmul work) and keeps a fifth as much.
    "none"     no rematerialisation: autodiff keeps whatever each layer's backward reads.

How the values are kept: kept.py.
"""

from __future__ import annotations

from jora_model.errors import JoraError

POLICIES = ("matmuls", "layer", "none")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise JoraError(f"remat must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy
