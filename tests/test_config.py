"""Model settings: Llama-2's presets and the readers of Meta's and HF's config files."""

from __future__ import annotations

import json

import pytest
import transformers

from jora_model.model.config import LlamaConfig, PRESETS, meta_ffn_dim, read_hf_config, read_meta_params
from jora_model.errors import JoraError


# Exact counts of the released checkpoints, and the rounded figures Meta publishes. 13B's exact count is
# 0.12% above "13.0B": the published figure is rounded to 0.1B, so we check rounding at the published
# precision and the exact count, which a wrong shape anywhere would change. Llama 3.2's 1B and 3B tie
# the head to the embedding: counting a head would add 262,668,288 and 393,984,000. Their exact counts
# are the sums of their safetensors (Hugging Face shows 1.24B and 3.21B; the 1B is 0.3% under 1.24B).
@pytest.mark.parametrize("name,exact,published,digits", [
    ("7B", 6_738_415_616, 6.74, 2), ("13B", 13_015_864_320, 13.0, 1), ("70B", 68_976_648_192, 69.0, 1),
    ("llama3-8B", 8_030_261_248, 8.03, 2), ("llama3-70B", 70_553_706_496, 70.6, 1),
    ("llama3.2-1B", 1_235_814_400, 1.24, 2), ("llama3.2-3B", 3_212_749_824, 3.21, 2),
    ("llama3.1-405B", 405_853_388_800, 405.9, 1)])
def test_presets_match_published_parameter_counts(name, exact, published, digits):
    count = PRESETS[name].param_count()
    assert count == exact
    assert round(count / 1e9, digits) == published
    if name not in ("13B", "llama3.2-1B"):
        assert abs(count - published * 1e9) / (published * 1e9) < 1e-3


def test_llama3_2_presets_are_tied_and_scaled_by_32():
    for name, dim, layers, heads in (("llama3.2-1B", 2048, 16, 32), ("llama3.2-3B", 3072, 28, 24)):
        c = PRESETS[name]
        assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == \
            (128256, dim, layers, heads, 8, 8192)
        assert c.tie_word_embeddings and (c.rope_scaling_factor, c.rope_theta, c.max_seq_len) == \
            (32.0, 500000.0, 131072)
        untied = c.replace(tie_word_embeddings=False)
        assert untied.param_count() - c.param_count() == 128256 * dim
    big = PRESETS["llama3.1-405B"]
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.ffn_dim, big.rope_scaling_factor) == \
        (16384, 126, 128, 8, 53248, 8.0)
    assert not big.tie_word_embeddings


def test_presets_match_transformers_parameter_count():
    """Our count formula against transformers' own model (on the meta device: no memory)."""
    import torch

    for config in PRESETS.values():
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, tie_word_embeddings=config.tie_word_embeddings)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(hf_config)
        # parameters() counts a tied head's weight once, as the embedding
        assert sum(p.numel() for p in model.parameters()) == config.param_count()


def test_real_shapes():
    p = PRESETS
    assert (p["7B"].dim, p["7B"].n_layers, p["7B"].ffn_dim) == (4096, 32, 11008)
    assert (p["13B"].dim, p["13B"].n_layers, p["13B"].ffn_dim) == (5120, 40, 13824)
    assert (p["70B"].dim, p["70B"].n_layers, p["70B"].ffn_dim, p["70B"].n_heads, p["70B"].n_kv_heads) == \
        (8192, 80, 28672, 64, 8)
    assert p["70B"].n_rep == 8 and p["7B"].head_dim == 128


def test_meta_params_reader(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                                "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}))
    assert read_meta_params(path, vocab_size=32000) == PRESETS["70B"]
    with pytest.raises(JoraError, match="vocab_size is -1"):
        read_meta_params(path)
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100, "rope_theta": 5e5}))
    config = read_meta_params(path)
    assert (config.vocab_size, config.n_kv_heads, config.rope_theta) == (100, 4, 5e5)
    assert config.ffn_dim == meta_ffn_dim(64, 256, None) == 256
    with pytest.raises(JoraError, match="disagrees"):
        read_meta_params(path, vocab_size=99)


@pytest.mark.parametrize("content,message", [
    ("{", "not valid JSON"),
    (json.dumps({"n_layers": 2, "n_heads": 4}), "missing field 'dim'"),
    (json.dumps({"dim": "64", "n_layers": 2, "n_heads": 4}), "wrong type"),
    (json.dumps({"dim": 66, "n_layers": 2, "n_heads": 4, "vocab_size": 10}), "not divisible"),
])
def test_meta_params_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_text(content)
    with pytest.raises(JoraError, match=message) as info:
        read_meta_params(path, vocab_size=10)
    assert str(path) in str(info.value)


def test_hf_config_reader(tmp_path):
    hf = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                  rope_theta=5e5, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    config, tied = read_hf_config(tmp_path / "config.json")
    assert config == LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                 norm_eps=1e-5, rope_theta=5e5, max_seq_len=hf.max_position_embeddings,
                                 tie_word_embeddings=True)
    assert tied


def test_hf_config_of_another_architecture_is_refused(tmp_path):
    transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(JoraError, match="not a Llama model"):
        read_hf_config(tmp_path / "config.json")


def test_settings_round_trip_and_validation():
    config = PRESETS["13B"]
    assert LlamaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(JoraError, match="unknown model settings"):
        LlamaConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(JoraError, match="n_kv_heads"):
        config.replace(n_kv_heads=3)


SCALED = dict(rope_theta=5e5, rope_scaling_factor=8, rope_low_freq_factor=1, rope_high_freq_factor=4,
              rope_original_max_len=8192)


def test_rope_scaling_round_trips_and_plain_configs_keep_their_old_dict():
    plain = PRESETS["7B"]
    assert not any(key.startswith("rope_") and key != "rope_theta" for key in plain.to_dict())
    scaled = plain.replace(**SCALED)
    assert scaled.rope_scaling_factor == 8.0 and isinstance(scaled.rope_scaling_factor, float)
    assert LlamaConfig.from_dict(scaled.to_dict()) == scaled and hash(scaled) != hash(plain)
    assert LlamaConfig.from_dict(json.loads(json.dumps(scaled.to_dict()))) == scaled
    # a store written before scaling existed has no such fields and still loads as plain rotary
    assert LlamaConfig.from_dict(plain.to_dict()) == plain and plain.rope_scaling_factor is None


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling_factor=0.5), "at least 1"),
    (dict(rope_scaling_factor="8"), "positive number"),
    (dict(rope_scaling_factor=8, rope_high_freq_factor=1.0), "must exceed"),
    (dict(rope_scaling_factor=8, rope_original_max_len=8192.0), "positive integer"),
    (dict(rope_high_freq_factor=2.0), "rope_scaling_factor is not"),
])
def test_rope_scaling_validation(changes, message):
    with pytest.raises(JoraError, match=message):
        PRESETS["7B"].replace(**changes)


def test_meta_params_scaled_rope(tmp_path):
    path = tmp_path / "params.json"
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100, "rope_theta": 5e5}
    path.write_text(json.dumps({**base, "use_scaled_rope": False}))
    assert read_meta_params(path).rope_scaling_factor is None
    path.write_text(json.dumps({**base, "use_scaled_rope": True}))
    c = read_meta_params(path)
    assert (c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_len) == \
        (8.0, 1.0, 4.0, 8192)
    path.write_text(json.dumps({**base, "use_scaled_rope": True, "rope_scaling_factor": 32,
                                "rope_high_freq_factor": 4.0}))
    assert read_meta_params(path).rope_scaling_factor == 32.0
    path.write_text(json.dumps({**base, "use_scaled_rope": True, "rope_scaling_factor": "big"}))
    with pytest.raises(JoraError, match="rope_scaling_factor") as info:
        read_meta_params(path)
    assert str(path) in str(info.value)


def _hf_dict(**rope) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96, **rope}


def test_hf_config_llama3_rope_in_either_key(tmp_path):
    path = tmp_path / "config.json"
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    path.write_text(json.dumps(_hf_dict(rope_theta=5e5, rope_scaling={**llama3, "type": "llama3"})))
    legacy = read_hf_config(path)[0]
    path.write_text(json.dumps(_hf_dict(rope_parameters={**llama3, "rope_theta": 5e5})))
    assert read_hf_config(path)[0] == legacy
    assert (legacy.rope_scaling_factor, legacy.rope_theta) == (32.0, 5e5)
    path.write_text(json.dumps(_hf_dict(rope_parameters={"rope_type": "llama3", "factor": 8.0})))
    with pytest.raises(JoraError, match="lacks 'low_freq_factor'"):
        read_hf_config(path)


@pytest.mark.parametrize("rope_type", ["yarn", "linear"])
def test_hf_config_other_rope_types_name_the_file_and_type(tmp_path, rope_type):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_dict(rope_scaling={"type": rope_type, "factor": 4.0})))
    with pytest.raises(JoraError) as info:
        read_hf_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and repr(rope_type) in message


def test_tied_setting_round_trips_and_untied_configs_keep_their_old_dict():
    untied = PRESETS["7B"]
    assert "tie_word_embeddings" not in untied.to_dict()  # stores written before the field still load
    tied = PRESETS["llama3.2-1B"]
    assert tied.to_dict()["tie_word_embeddings"] is True
    assert LlamaConfig.from_dict(json.loads(json.dumps(tied.to_dict()))) == tied
    with pytest.raises(JoraError, match="tie_word_embeddings must be true or false"):
        untied.replace(tie_word_embeddings="yes")


@pytest.mark.parametrize("extra,context", [
    ({}, 4096),  # Llama 2
    ({"vocab_size": 128256, "rope_theta": 5e5}, 8192),  # Llama 3, no scaling
    ({"vocab_size": 128256, "rope_theta": 5e5, "use_scaled_rope": True}, 131072),  # Llama 3.1+
    ({"vocab_size": 128256, "use_scaled_rope": True, "max_seq_len": 2048}, 2048),  # written: taken as written
])
def test_meta_context_length_is_meta_s_for_each_family(tmp_path, extra, context):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, **extra}))
    assert read_meta_params(path, vocab_size=extra.get("vocab_size", 100)).max_seq_len == context


@pytest.mark.parametrize("changes,fragment", [
    ({"norm_eps": "abc"}, "'norm_eps' must be a number ('abc')"),
    ({"norm_eps": None}, "'norm_eps' must be a number (None)"),
    ({"rope_theta": "5e5"}, "'rope_theta' must be a number"),
    ({"max_seq_len": 8192.5}, "'max_seq_len' must be an integer"),
    ({"moe_args": {"num_experts": 16}}, "mixture of experts"),
])
def test_meta_params_bad_numbers_are_one_line_naming_the_file(tmp_path, changes, fragment):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100, **changes}))
    with pytest.raises(JoraError) as info:
        read_meta_params(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


# config.json files of models that are not (plain) Llama, and Llama configs with numbers written wrongly
HF_BAD = {
    "llama4": ({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"]}, "'llama4'"),
    "mistral": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096},
                "'mistral'"),
    "mixtral": ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8},
                "'mixtral'"),
    "other head": ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    "llama with sliding window": ({"sliding_window": 4096}, "sliding-window attention"),
    "llama with experts": ({"num_local_experts": 8, "num_experts_per_tok": 2}, "mixture of experts"),
    "eps a word": ({"rms_norm_eps": "tiny"}, "'rms_norm_eps' must be a number ('tiny')"),
    "theta null": ({"rope_theta": None}, "'rope_theta' must be a number (None)"),
    "context a string": ({"max_position_embeddings": "4k"}, "'max_position_embeddings' must be an integer"),
    "tie a string": ({"tie_word_embeddings": "true"}, "'tie_word_embeddings' must be true or false"),
}


@pytest.mark.parametrize("case", HF_BAD)
def test_hf_config_bad_input_is_one_line_naming_config_json(tmp_path, case):
    changes, fragment = HF_BAD[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_hf_dict(), **changes}))
    with pytest.raises(JoraError) as info:
        read_hf_config(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_a_null_sliding_window_is_plain_llama(tmp_path):
    """Llama configs re-saved by some tools carry `sliding_window: null`: full attention, as Llama."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_dict(sliding_window=None, num_local_experts=None)))
    assert read_hf_config(path)[0].dim == 64
