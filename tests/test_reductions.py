"""row_max is jnp.max over the last axis, computed as a tree of elementwise maxima."""

import jax.numpy as jnp
import numpy as np
import pytest

from jora_model.reductions import row_max


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
