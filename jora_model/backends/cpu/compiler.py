"""How the cpu kernels' programs are compiled, and the host memory the compiler leaves behind.

On the CPU, XLA hands dots and row reductions to YNNPACK by default. Its dots are what make bf16
fast there, but its row reductions ran slower than XLA's own loop fusions on every shape of a step
measured, and in a step each one also waited for the thread pool behind a concurrent dot
(benchmarks/RESULTS.md). So only dots go to YNNPACK.

Compiling a Llama step leaves a few hundred MB of freed heap behind (the compiler's own working
memory), and glibc keeps it; the first step then allocates its buffers on top. Handing the free heap
back after compiling makes the process's peak what the step itself needs: on a CPU the step's
buffers are host memory, so that peak is the run's.
"""

from __future__ import annotations

import ctypes
import ctypes.util

COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT"}


def release_freed_memory() -> None:
    """Return free heap pages to the system (glibc's malloc_trim); a no-op on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)
