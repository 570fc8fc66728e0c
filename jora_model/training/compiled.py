"""Jitted functions compiled ahead of their first call, with the kernel set's compiler options, then
its after-compile step (the cpu set hands the compiler's freed memory back: backends/cpu/compiler.py).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from jora_model.backends import Kernels

log = logging.getLogger(__name__)

_refused: set[str] = set()  # kernel sets whose compiler options this jaxlib rejected


def compile_lowered(lowered, kernels: Kernels):
    """lowered.compile() with the kernel set's compiler options; without them if this jaxlib refuses
    them (logged once): the options change speed, never results beyond the order of a sum."""
    options = dict(kernels.compiler_options)
    if options and kernels.name not in _refused:
        try:
            return lowered.compile(compiler_options=options)
        except Exception as exc:  # jaxlib raises its own runtime error type for an unknown option or value
            if not any(name in str(exc) for name in options):
                raise
            _refused.add(kernels.name)
            log.info("this jaxlib refuses the %s kernels' compiler options %s (%s); compiling without them",
                     kernels.name, options, str(exc).splitlines()[0])
    return lowered.compile()


class AheadOfTime:
    """Call like the jitted function; each new argument signature is compiled first, then the freed
    kernel set's after-compile step runs, then the compiled program runs (donation and shardings as jitted).

    `prepare` compiles for abstract arguments (jax.ShapeDtypeStruct leaves with their shardings)
    before any real argument exists: a caller that prepares before loading the weights keeps the
    compiler's working memory (a few hundred MB for a Llama step) and the weights from adding up."""

    def __init__(self, jitted: Callable, kernels: Kernels):
        self.jitted = jitted
        self.kernels = kernels
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
            compiled = compile_lowered(self.jitted.lower(*args), self.kernels)
            self.kernels.after_compile()
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
