"""Jitted functions compiled ahead of their first call, with this project's compiler options and the
compiler's freed memory handed back.

Compiling a Llama step leaves a few hundred MB of freed heap behind (the compiler's own working memory),
and glibc keeps it. The first step then allocates its buffers on top, so the process's peak RSS is
compilation leftovers plus the step (measured at `small`: 800 MB instead of 614 MB). Compiling
explicitly, then returning the free heap to the system before the first run, makes the peak what the
step itself needs.

Compiler options (`compiler_options`) are chosen per backend. On the CPU, XLA hands dots and row
reductions to YNNPACK by default. The dots are what make bf16 fast there (XLA's own emitter runs
them at a third of the speed), but the reductions were slower than XLA's own loop fusions on every
shape of a step measured: 0.9 against 0.22 ms for a [512, 512] multiply-and-sum on two cores, and
in a train step each one also waited for the thread pool behind a concurrent dot (RMSNorm's and
attention's backward sums took 2-5 ms apiece at `base110m`). So on the CPU only dots go to YNNPACK.
A jaxlib that does not know an option compiles without it (logged once): the options change speed,
never results beyond the order of a sum.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

# Per backend platform; see the module docstring for why.
COMPILER_OPTIONS: dict[str, dict[str, str]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT"},
}
_refused: set[str] = set()  # platforms whose jaxlib rejected their options


def _platform(args) -> str:
    """The backend the arguments live on (their shardings' devices), else JAX's default backend."""
    import jax

    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and getattr(sharding, "device_set", None):
            return next(iter(sharding.device_set)).platform
    return jax.default_backend()


def compile_lowered(lowered, platform: str):
    """lowered.compile() with the platform's COMPILER_OPTIONS; without them if this jaxlib refuses them."""
    options = COMPILER_OPTIONS.get(platform)
    if options and platform not in _refused:
        try:
            return lowered.compile(compiler_options=options)
        except Exception as exc:  # jaxlib raises its own runtime error type for an unknown option or value
            if not any(name in str(exc) for name in options):
                raise
            _refused.add(platform)
            log.info("this jaxlib refuses the %s compiler options %s (%s); compiling without them",
                     platform, options, str(exc).splitlines()[0])
    return lowered.compile()


def release_freed_memory() -> None:
    """Return free heap pages to the system (glibc's malloc_trim); a no-op on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


class AheadOfTime:
    """Call like the jitted function; each new argument signature is compiled first, then the freed
    compiler memory is released, then the compiled program runs (donation and shardings as jitted).

    `prepare` compiles for abstract arguments (jax.ShapeDtypeStruct leaves with their shardings)
    before any real argument exists: a caller that prepares before loading the weights keeps the
    compiler's working memory (a few hundred MB for a Llama step) and the weights from adding up."""

    def __init__(self, jitted: Callable):
        self.jitted = jitted
        self._compiled: dict[Any, Callable] = {}

    @staticmethod
    def _key(args) -> Any:
        import jax

        leaves, structure = jax.tree.flatten(args)
        return (structure, *((getattr(leaf, "shape", None), getattr(leaf, "dtype", type(leaf)),
                              getattr(leaf, "sharding", None)) for leaf in leaves))

    def _compile(self, key, args) -> Callable:
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = compile_lowered(self.jitted.lower(*args), _platform(args))
            release_freed_memory()
            self._compiled[key] = compiled
        return compiled

    def prepare(self, *abstract_args) -> None:
        self.compiled(*abstract_args)

    @property
    def compiled_signatures(self) -> int:
        return len(self._compiled)

    def __call__(self, *args):
        return self._compile(self._key(args), args)(*args)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def compiled(self, *args):
        """The executable these arguments run (compiled now if it is not yet): what to ask for its
        memory_analysis() or as_text(), since a plain lower().compile() lacks the compiler options."""
        return self._compile(self._key(args), args)
