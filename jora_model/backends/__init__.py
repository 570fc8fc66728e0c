"""Backend kernels: the few operations whose fastest form depends on the compiler, behind one interface.

`cpu` holds the forms XLA's CPU backend runs fast; `portable` is plain JAX, which XLA compiles well on
GPUs and TPUs (and which runs on the CPU too, so both are tested here). A run picks its set once, from
the settings and the mesh's platform; the model, the loss and the step only call the set they are given.
"""

from __future__ import annotations

from jora_model.errors import JoraError

KERNELS = ("auto", "cpu", "portable")


def check_kernels(name: str) -> None:
    if name not in KERNELS:
        raise JoraError(f"kernels must be one of {', '.join(KERNELS)}, got {name!r}")


def resolve_kernels(name: str, platform: str) -> str:
    """The set a run uses: `auto` is cpu on a CPU and portable on any other platform."""
    check_kernels(name)
    if name != "auto":
        return name
    return "cpu" if platform == "cpu" else "portable"
