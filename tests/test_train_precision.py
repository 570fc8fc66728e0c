"""The fast training step (bf16 frozen base, bf16 matmuls with fp32 accumulation, forward and backward)
against the fp32 reference: same gradients where they must be exact, same loss curve where bf16 rounds.

Tolerances: in fp32 the custom backward is the same arithmetic as autodiff's, so gradients agree to
float rounding (1e-6 relative). In bf16 (8 mantissa bits, relative rounding 2^-9 = 0.2% per operand)
the loss of each of 50 steps must stay within 1e-2 relative of the fp32 run, the issue's criterion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jora_model.backends.cpu as cpu_kernels
from jora_model.backends.cpu import attention
from jora_model.backends.cpu import linear as cpu_linear
from jora_model.model import llama, norm_act
from jora_model.training import loss
from jora_model.model.lora import LoraSettings, init_lora_params, merge_params
from jora_model.formats.store import Store, load_params
from jora_model.training.step import OptimizerSettings, make_step_functions
from tests.train_helpers import tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_model):
    return tiny_store(tmp_path_factory.mktemp("precision"), tokenizer_model)[1]


def _frozen(store, dtype):
    s = Store(store)
    try:
        return jax.tree.map(lambda a: a.astype(dtype), load_params(s))
    finally:
        s.close()


def test_custom_matmul_backward_equals_autodiff_in_fp32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)

    def loss(matmul):
        return lambda x, w: jnp.sum(jnp.sin(matmul(x, w)) * probe)

    ours = jax.grad(loss(cpu_linear.matmul), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(lambda x, w: jnp.matmul(x, w)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_lora_update_backward_equals_autodiff_in_fp32():
    """The adapter path's hand-ordered backward (dA as (g^T h)^T, cpu_linear.lora_update) against autodiff of
    (h @ a) @ b: the same sums in another order, so equal to fp32 rounding; with a leading batch axis
    and a rank that is not a multiple of anything."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 7, 24)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(24, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)

    def loss(update):
        return lambda h, a, b: jnp.sum(jnp.sin(update(h, a, b)) * probe)

    np.testing.assert_allclose(cpu_linear.lora_update(h, a, b), (h @ a) @ b, rtol=1e-6, atol=1e-5)
    ours = jax.jit(jax.grad(loss(cpu_linear.lora_update), argnums=(0, 1, 2)))(h, a, b)
    plain = jax.grad(loss(lambda h, a, b: (h @ a) @ b), argnums=(0, 1, 2))(h, a, b)
    for mine, reference in zip(ours, plain):
        assert mine.shape == reference.shape
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(reference))))


def test_norm_and_swiglu_backward_equal_autodiff():
    """The hand-written backward passes of RMSNorm and SwiGLU (norm_act.py) against autodiff of the
    plain formulas: equal in fp32 (scale's gradient too); in bf16 within bf16 rounding of the result."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)) * 3, jnp.float32)
    up = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    scale = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def plain_norm(x, scale):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-5)
        return normed.astype(x.dtype) * scale.astype(x.dtype)

    pairs = [(lambda x, s: norm_act.rms_norm(x, s, 1e-5), plain_norm, scale),
             (norm_act.swiglu, lambda g, u: jax.nn.silu(g) * u, up)]
    for ours, plain, second in pairs:
        def loss(f):
            return lambda a, b: jnp.sum(jnp.sin(f(a, b).astype(jnp.float32)) * probe)
        np.testing.assert_allclose(ours(x, second), plain(x, second), rtol=1e-6, atol=1e-6)
        mine = jax.grad(loss(ours), argnums=(0, 1))(x, second)
        reference = jax.grad(loss(plain), argnums=(0, 1))(x, second)
        for a, b in zip(mine, reference):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        # bf16: the same gradient to within bf16's rounding (8 bits of mantissa, a few ops deep)
        xb, sb = x.astype(jnp.bfloat16), second.astype(jnp.bfloat16)
        mine = jax.grad(loss(ours), argnums=(0, 1))(xb, sb)[0].astype(jnp.float32)
        exact = jax.grad(loss(plain), argnums=(0, 1))(xb.astype(jnp.float32), sb.astype(jnp.float32))[0]
        np.testing.assert_allclose(mine, exact, rtol=3e-2, atol=3e-2 * float(jnp.max(jnp.abs(exact))))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [512, 4, 1])  # one block of queries (4 if causal); 2 blocks; 8 blocks
def test_attention_backward_equals_autodiff_in_fp32(monkeypatch, block, causal):
    """Grouped queries (K=2 KV heads, R=3 queries each), two packed segments and padding. causal=True
    skips the key blocks past each query block's end; the result must not change."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    assert 8 // attention.block_length(8, causal) == (max(8 // block, 4) if causal else 8 // min(block, 8))
    rng = np.random.default_rng(1)
    b, t, k_heads, rep, e = 2, 8, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, t, k_heads, rep, e)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, k_heads, e)), jnp.float32) for _ in range(2))
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8])
    visibility = attention.Visibility.causal(segments)
    # the reference mask, written out: causal, and within a segment
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def plain(q, k, v):
        scores = jnp.einsum("btkre,bske->bkrts", q, k) * e ** -0.5
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -1e30), axis=-1)
        return jnp.einsum("bkrts,bske->btkre", probs, v)

    def ours(q, k, v):
        return attention.attend(q, k, v, visibility, causal)

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.tanh(attend(q, k, v)) * probe)

    np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    mine = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for a, b_ in zip(mine, reference):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, including inside scan, remat and custom-vjp bodies."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


def _step_dots(store, remat: str = "matmuls") -> tuple[list, dict]:
    """(every dot_general of a bf16, remat, LoRA gradient over 16 tokens of the tiny model, its frozen weights)."""
    frozen = _frozen(store, jnp.bfloat16)
    config = Store(store).config
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    model = llama.transformed(config, llama.ModelOptions("bfloat16", "bfloat16", remat=remat, lora=lora,
                                                                     kernels="cpu"))
    trainable = jax.tree.map(jnp.asarray, init_lora_params(config, lora, 0))
    tokens = jnp.zeros((1, 16), jnp.int32)

    def loss(t):
        return model.apply(merge_params(frozen, t), None, tokens).sum()

    return _dots(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr), frozen


def test_backward_matmuls_of_the_frozen_weights_stay_in_bf16(store):
    """The issue's profile: autodiff promoted the bf16 weights to fp32 in the backward pass, so the
    'bf16' step ran at fp32 speed. Every matmul that reads a frozen weight must take it in bf16."""
    dots, frozen = _step_dots(store)
    weight_shapes = {leaf.shape[-2:] for leaf in jax.tree.leaves(frozen) if leaf.ndim >= 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}  # transposed in the backward
    on_weights = [e for e in dots if any(v.aval.shape[-2:] in weight_shapes and v.aval.ndim == 2
                                         for v in e.invars)]
    assert len(on_weights) >= 2 * 8  # 7 per layer (the scanned body) + lm_head, forward and backward
    promoted = [e for e in on_weights if any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
    assert not promoted, [str(e)[:200] for e in promoted]
    # attention's [T, T] matmuls too: operands in bf16, forward and backward
    attention = [e for e in dots if any(v.aval.ndim == 5 for v in e.invars)]
    assert len(attention) >= 2 + 4
    assert all(v.aval.dtype == jnp.bfloat16 for e in attention for v in e.invars), [str(e)[:200] for e in attention]


def _weight_dots(dots: list, frozen: dict) -> list:
    """The dot_generals that read a frozen matrix of the layer stack (one layer's, or its transpose)."""
    shapes = {leaf.shape[1:] for module, leaves in frozen.items() if module.startswith("layers/")
              for leaf in leaves.values() if leaf.ndim == 3}
    shapes |= {s[::-1] for s in shapes}
    return [e for e in dots if any(v.aval.ndim == 2 and v.aval.shape in shapes for v in e.invars)]


@pytest.mark.parametrize("remat, per_layer", [("matmuls", 7 + 7), ("layer", 7 + 6 + 7), ("none", 7 + 7)])
def test_what_each_remat_policy_recomputes(store, remat, per_layer):
    """Matmuls on a layer's frozen weights in the differentiated step: each runs once forward and once
    for the input's gradient (7 + 7). "matmuls" keeps their outputs, so nothing is recomputed, as
    without remat; "layer" recomputes all but down_proj (whose output only the next layer reads)."""
    dots, frozen = _step_dots(store, remat)
    assert len(_weight_dots(dots, frozen)) == per_layer


@pytest.mark.parametrize("remat", ["matmuls", "layer"])
def test_remat_does_not_recompute_attention_forward(store, remat):
    """A rematerialised layer keeps attention's output and row statistics, so its backward pass runs
    attention's two forward matmuls once (the forward) and its own five (llama.decoder_layer): per
    query block, 7 batched matmuls in the differentiated layer body. Recomputing the forward would
    make it 9, and skipping no key blocks would make the blocks' keys longer, not fewer."""
    dots, _ = _step_dots(store, remat)
    batched = [e for e in dots if e.params["dimension_numbers"][1][0]]  # attention's; projections have none
    blocks = 16 // attention.block_length(16, causal=True)
    assert blocks == 4
    assert len(batched) == 7 * blocks, len(batched)
    # the causal blocks read only the keys up to their own end: 4, 8, 12 and 16 of them (k and v are
    # [B, K, S, E] or transposed, [B, K, E, S])
    head_dim = Store(store).config.head_dim
    key_lengths = sorted({v.aval.shape[2] if v.aval.shape[3] == head_dim else v.aval.shape[3]
                          for e in batched for v in e.invars if v.aval.ndim == 4})
    assert key_lengths == [4, 8, 12, 16], key_lengths


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
def test_fast_step_follows_the_fp32_reference_for_50_steps(store, kernels):
    """Both kernel sets' bf16 steps against one fp32 reference (the cpu set's)."""
    config = Store(store).config
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(5):  # a small epoch, repeated, so the loss really moves
        ids = rng.integers(3, config.vocab_size, size=(1, 2, 48)).astype(np.int32)
        mask = np.zeros_like(ids, dtype=bool)
        mask[..., 16:] = True
        batches.append({"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask),
                        "segment_ids": jnp.ones_like(jnp.asarray(ids))})
    curves = {}
    for name, compute, dtype, ops in (("fp32", "float32", jnp.float32, "cpu"),
                                      ("fast", "bfloat16", jnp.bfloat16, kernels)):
        fns = make_step_functions(config, lora, OptimizerSettings(lr=1e-2, warmup_steps=5, total_steps=50),
                                  compute, remat="matmuls", seed=0, kernels=ops)
        frozen = _frozen(store, dtype)
        state = fns.init(init_lora_params(config, lora, 0))
        losses = []
        for step in range(50):
            state, metrics = fns.train_step(state, frozen, batches[step % len(batches)])
            losses.append(float(metrics.loss))
        curves[name] = np.asarray(losses)
    ref, fast = curves["fp32"], curves["fast"]
    assert ref[-5:].mean() < ref[:5].mean() - 0.5, ref  # it trained: the curves must agree while moving
    relative = np.abs(fast - ref) / ref
    assert relative.max() < 1e-2, relative
    assert relative.max() > 0  # bf16 really was used: the curves are not the same arithmetic


@pytest.mark.parametrize("kernels,budget", [("cpu", 1 << 22), ("cpu", 3 * 2 * 50), ("portable", None)])
def test_chunked_head_loss_equals_the_full_logits_loss(monkeypatch, kernels, budget):
    """head_nll (chunked, gradient computed in the forward pass) against the plain loss on full fp32
    logits, with two packed segments, padding and a partial loss mask. The cpu set in one chunk and in
    3-token chunks (a scan of 8); the portable set's token-sized chunks."""
    if budget is not None:
        monkeypatch.setattr(cpu_kernels, "LOGITS_PER_CHUNK", budget)
    rng = np.random.default_rng(2)
    b, t, d, vocab = 2, 24, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.7)
    segments = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4, [1] * 24])
    if budget is not None:
        assert cpu_kernels.loss_chunk(b, t, vocab) == (24 if budget > 1e6 else 3)

    def plain(hidden):
        return loss.token_losses(hidden @ w, ids, mask, segments)[0]

    def chunked(hidden):
        return loss.losses_from_hidden(hidden, w, ids, mask, segments, kernels)[0]

    np.testing.assert_allclose(chunked(hidden), plain(hidden), rtol=1e-6)
    assert float(loss.losses_from_hidden(hidden, w, ids, mask, segments, kernels)[1]) == float(
        loss.token_losses(hidden @ w, ids, mask, segments)[1]) > 0
    np.testing.assert_allclose(jax.grad(chunked)(hidden), jax.grad(plain)(hidden), rtol=1e-5, atol=1e-6)
    # under jit too, as the train step runs it
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(hidden), jax.grad(plain)(hidden), rtol=1e-5, atol=1e-6)
