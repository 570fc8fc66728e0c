"""Remat policies: what a rematerialised decoder layer keeps for its backward pass.

A policy names the values kept; everything else the backward pass needs is recomputed from them:
    "matmuls"  every matmul's output (q, k, v after rotary, attention's output and row statistics,
               the residual stream after attention, gate and up) and the layer's input. The rebuilt
               layer recomputes only elementwise work (norms, rotary, SiLU, dropout masks) and LoRA's
               rank-r matmuls: no frozen-weight matmul runs twice.
    "layer"    the layer's input and attention's output and statistics only: the rebuilt layer runs
               every projection again (about 40% more matmul work) and keeps a fifth as much.
    "none"     no rematerialisation: autodiff keeps whatever each layer's backward reads.

How a value is kept is the kernel set's (`Kernels.keep`): it names the value KEPT_NAME, and the
layer's remat policy saves exactly the values of that name.
"""

from __future__ import annotations

from typing import Callable

from jora_model.errors import JoraError

POLICIES = ("matmuls", "layer", "none")
KEPT_NAME = "kept"  # the checkpoint name of every value a policy keeps


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise JoraError(f"remat must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def keeps(policy: str, *, projection: bool) -> bool:
    """Whether `policy` keeps a value. projection: a matmul's output, which only "matmuls" keeps (the
    layer's input and attention's output are kept by both remat policies)."""
    return policy == "matmuls" or (policy == "layer" and not projection)


def remat_layer(layer: Callable, policy: str, remat: Callable) -> Callable:
    """The layer under `remat` (jax.checkpoint or a framework's wrapper of it), saving the values named
    KEPT_NAME; the layer itself unchanged for "none"."""
    import jax

    if check_policy(policy) == "none":
        return layer
    return remat(layer, policy=jax.checkpoint_policies.save_only_these_names(KEPT_NAME))
