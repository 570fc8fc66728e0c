"""AheadOfTime compiles with the kernel set's compiler options: for the cpu set, dots go to YNNPACK and row
reductions stay with XLA's own fusions; a jaxlib that refuses an option still compiles."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jora_model.backends import kernels_for
from jora_model.training import compiled as compiled_module
from jora_model.training.compiled import AheadOfTime


def _norm_then_matmul(x, w):
    """A row reduction (RMSNorm's) feeding a bf16 matmul with fp32 accumulation, as in a step."""
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-5)
    return jnp.matmul((x * r).astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def _arguments():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((256, 256)), jnp.float32),
            jnp.asarray(rng.standard_normal((256, 512)) / 16, jnp.bfloat16))


def _ynn_roots(text: str) -> list[str]:
    """The root opcode of every fused computation that XLA hands to YNNPACK."""
    called = re.findall(r"calls=%([\w.-]+)[^\n]*\"kind\":\"__ynn_fusion\"", text)
    roots = []
    for name in called:
        body = re.search(r"^%" + re.escape(name) + r" .*?^}", text, re.S | re.M).group(0)
        roots.append(re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", body).group(1))
    return roots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options under test are the CPU's")
def test_cpu_step_keeps_dots_in_ynnpack_and_reductions_in_xla():
    args = _arguments()
    ahead = AheadOfTime(jax.jit(_norm_then_matmul), kernels_for("cpu"))
    roots = _ynn_roots(ahead.compiled(*args).as_text())
    assert "dot" in roots, roots  # losing YNNPACK's dots made the train step twice as slow
    assert "reduce" not in roots, roots
    np.testing.assert_allclose(np.asarray(ahead(*args)), np.asarray(jax.jit(_norm_then_matmul)(*args)),
                               rtol=1e-6, atol=1e-6)


def test_each_kernel_set_compiles_with_its_own_options(monkeypatch):
    """What jora asks of the compiler, whatever this jaxlib does by default: the cpu set's options
    (only dots to YNNPACK), and no options at all for the portable set."""
    from jora_model.backends.cpu import compiler as cpu_compiler

    monkeypatch.setattr(compiled_module, "_refused", set())
    asked = []

    class Lowered:
        def compile(self, compiler_options=None):
            asked.append(compiler_options)
            return "executable"

    for name in ("cpu", "portable"):
        assert compiled_module.compile_lowered(Lowered(), kernels_for(name, "cpu")) == "executable"
    assert asked == [dict(cpu_compiler.COMPILER_OPTIONS), None]


def test_refused_option_compiles_without_it(monkeypatch, caplog):
    refused = dataclasses.replace(kernels_for("cpu"),
                                  compiler_options={"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"})
    monkeypatch.setattr(compiled_module, "_refused", set())
    args = _arguments()
    with caplog.at_level("INFO", logger="jora_model.training.compiled"):
        out = AheadOfTime(jax.jit(_norm_then_matmul), refused)(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(_norm_then_matmul)(*args)), rtol=1e-6, atol=1e-6)
    assert "cpu" in compiled_module._refused
    assert "compiling without them" in caplog.text
