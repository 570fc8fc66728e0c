"""Text generation for inspection: a KV cache under jit, greedy or nucleus sampling, stop at any of the
tokens that end generation (eos; a chat template's end of turn).

The prompt is filled in one jitted call (padded to a multiple of 64 so few shapes compile); then one
jitted call per new token reads and extends the cache. Padding written past the prompt is masked out
and overwritten by the first generated token before any query can see it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

import numpy as np

from jora_model.errors import JoraError


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int = 0


def _pad_to(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


class Generator:
    """Generation with a LoadedModel's parameters (base, or base + adapter)."""

    def __init__(self, model: Any, cache_length: int | None = None):
        import jax

        from jora_model.model.llama import ModelOptions, transformed_cached

        self.model = model
        self.config = model.config
        self.cache_length = cache_length or self.config.max_seq_len
        options = ModelOptions(compute_dtype=model.options.compute_dtype, lora=model.options.lora)
        apply = transformed_cached(self.config, options).apply
        self._step = jax.jit(lambda params, tokens, cache, index: apply(params, None, tokens, cache, index),
                             donate_argnums=(2,))
        self._pick = jax.jit(_pick_token)

    def generate(self, prompt_ids: list[int], settings: SamplingSettings = SamplingSettings(),
                 eos_id: int | Collection[int] | None = 2) -> list[int]:
        """New token ids after `prompt_ids` (which should start with bos), up to the first of `eos_id`
        (one id, or every id that ends generation; None: none does), which is left out."""
        import jax
        import jax.numpy as jnp

        from jora_model.model.llama import empty_cache

        stops = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, (int, np.integer)) else \
            {int(i) for i in eos_id}
        n = len(prompt_ids)
        if n == 0:
            raise JoraError("empty prompt")
        length = min(self.cache_length, _pad_to(n + settings.max_new_tokens))
        if n >= length:
            raise JoraError(f"prompt of {n} tokens leaves no room in the model's {self.cache_length}-token context")
        cache = empty_cache(self.config, 1, _pad_to(length), self.model.options.compute_dtype)
        padded = np.zeros((1, min(_pad_to(n), cache.k.shape[2])), np.int32)
        padded[0, :n] = prompt_ids
        logits, cache = self._step(self.model.params, jnp.asarray(padded), cache, jnp.int32(0))
        last = logits[:, n - 1]
        key = jax.random.PRNGKey(settings.seed)
        out: list[int] = []
        position = n
        while len(out) < settings.max_new_tokens and position < length:
            token = int(self._pick(last, jax.random.fold_in(key, position), settings.temperature, settings.top_p)[0])
            if token in stops:
                break
            out.append(token)
            logits, cache = self._step(self.model.params, jnp.asarray([[token]], jnp.int32), cache,
                                       jnp.int32(position))
            last = logits[:, 0]
            position += 1
        return out


def _pick_token(logits, key, temperature, top_p):
    """Greedy when temperature is 0, else nucleus sampling at that temperature. logits [B, V]."""
    import jax
    import jax.numpy as jnp

    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    keep = (cumulative - probs) < top_p  # always keeps the most likely token
    filtered = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, filtered, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


def generate_text(model: Any, tokenizer: Any, instruction: str, context: str = "",
                  settings: SamplingSettings = SamplingSettings(), generator: Generator | None = None,
                  template: Any = None) -> str:
    """The answer to one request, prompted exactly as training saw it: `template` is the training's
    (a jora_model.data.templates.Template; None: plain alpaca). Generation stops at any of its stop ids."""
    from jora_model.data.templates import load_template

    template = template or load_template("alpaca", tokenizer)
    generator = generator or Generator(model)
    ids = template.prompt_ids(instruction, context).tolist()
    return tokenizer.decode(generator.generate(ids, settings, template.stop_ids))
