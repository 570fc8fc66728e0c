"""row_max is jnp.max over the last axis, computed as a tree of elementwise maxima; shifted_exp builds on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jora_model.backends.cpu.reductions import row_max, shifted_exp


@pytest.mark.parametrize("width", [1, 7, 16, 48, 512, 32000, 250 * 3])
def test_row_max_equals_max(width):
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.normal(size=(3, 2, width)) * 50, jnp.float32)
    np.testing.assert_array_equal(row_max(x), jnp.max(x, axis=-1))


def test_row_max_keeps_nan_and_masked_rows():
    """A NaN anywhere in a row makes its max NaN (the NaN-loss check must see it), and a row of
    attention's masked fill stays at that fill."""
    x = np.full((3, 512), -1e30, np.float32)
    x[1, 300] = np.nan
    x[2] = np.arange(512)
    got = np.asarray(row_max(jnp.asarray(x)))
    assert got[0] == np.float32(-1e30) and np.isnan(got[1]) and got[2] == 511


def test_shifted_exp_gives_logsumexp_and_softmax():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1000)) * 20, jnp.float32)
    top, exps, total = shifted_exp(x)
    np.testing.assert_array_equal(top, jnp.max(x, axis=-1))
    # fp32 with one exp and one log per row: agreement to a few ulps of the result
    np.testing.assert_allclose(top + jnp.log(total), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(exps / total[:, None], jax.nn.softmax(x, axis=-1), rtol=1e-5, atol=1e-7)
