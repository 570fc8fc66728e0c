"""The hashed dropout mask: the right rate, unbiased, and no visible correlation between neighbours,
keys or bit positions. Bounds are five binomial standard deviations, so a correct generator fails
one of them with probability well under 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jora_model.model.dropout import dropout, hash_bits

N = 1 << 20


def _sigma(p: float, n: int) -> float:
    return 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_rate_and_expectation(rate):
    x = jnp.ones((4, 512, 512), jnp.float32)
    out = np.asarray(dropout(jax.random.PRNGKey(1), rate, x))
    dropped = (out == 0).mean()
    assert abs(dropped - rate) < _sigma(rate, out.size), dropped
    kept = out[out != 0]
    np.testing.assert_allclose(kept, 1 / (1 - rate), rtol=1e-6)  # inverted dropout: E[out] = x
    assert abs(out.mean() - 1) < _sigma(rate, out.size) / (1 - rate)


def test_neighbours_keys_and_bit_positions_look_independent():
    rate = 0.1
    shape = (1024, 1024)
    drop = np.asarray(hash_bits(jax.random.PRNGKey(3), shape)) < np.uint32(rate * 2 ** 32)
    both = rate * rate
    # neighbours along either axis, and the next row's same column (index + 1024)
    for a, b in ((drop[:, 1:], drop[:, :-1]), (drop[1:], drop[:-1])):
        assert abs((a & b).mean() - both) < _sigma(both, a.size), (a & b).mean()
    # another key: masks of different layers / targets / steps
    other = np.asarray(hash_bits(jax.random.PRNGKey(4), shape)) < np.uint32(rate * 2 ** 32)
    assert abs((drop & other).mean() - both) < _sigma(both, N)
    # every bit of the word is a fair coin
    bits = np.asarray(hash_bits(jax.random.PRNGKey(5), (N,)))
    ones = np.unpackbits(bits.view(np.uint8)).reshape(N, 32).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < _sigma(0.5, N)), ones
    # top byte uniform: chi-square with 255 degrees of freedom, under its 1e-4 tail (347.7)
    counts = np.bincount(bits >> 24, minlength=256)
    chi2 = ((counts - N / 256) ** 2 / (N / 256)).sum()
    assert chi2 < 347.7, chi2


def test_mask_is_a_function_of_key_and_shape_only():
    key = jax.random.PRNGKey(7)
    x32 = jnp.ones((2, 64, 96), jnp.float32)
    a = np.asarray(dropout(key, 0.2, x32)) == 0
    b = np.asarray(dropout(key, 0.2, x32.astype(jnp.bfloat16)).astype(jnp.float32)) == 0
    c = np.asarray(jax.jit(lambda k, x: dropout(k, 0.2, x))(key, x32)) == 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, np.asarray(dropout(jax.random.PRNGKey(8), 0.2, x32)) == 0)


def test_rate_zero_is_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    assert dropout(jax.random.PRNGKey(0), 0.0, x) is x
