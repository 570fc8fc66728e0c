"""Writing a parameter store as a Hugging Face Llama directory, an adapter as a PEFT adapter, and
checking both against our own model before anyone is told they are done.

Our store already uses transformers' rotate-half q/k layout, so the weights only need transposing
back to [out, in]. The tokenizer is written as tokenizer.json set up exactly like SentencePiece with
Llama's settings (a "▁" prepended, spaces replaced, no pre-tokenizer, literal "</s>" kept as text),
because transformers' own conversion drops the dummy prefix before a leading space. Llama 3's tokenizers
(Meta's tiktoken file, an HF tokenizer.json) are exported and checked by hf_tokenizer_export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.errors import JoraError
from jora_model.formats.layout import store_tensors
from jora_model.formats.names import LORA_LEAVES, TABLE
from jora_model.formats.safetensors_io import PlannedWriter, plan_shards
from jora_model.formats.store import Store, store_dtype
from jora_model.model.config import LlamaConfig

TOKENIZER_CHECKS = ["Hello world", "  two  spaces\tand a tab", " leading space", "héllo wörld € 搬送 🔋",
                    "literal </s> and <s> stay text", "### Response:\nok", "a\n\nb", "digits 12345", ""]


def hf_rope(config: LlamaConfig) -> dict[str, Any]:
    """rope_parameters for config.json: plain rotary, or Llama 3.1's scaling as transformers' "llama3"."""
    if config.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_len}


def hf_config(config: LlamaConfig, dtype: str, tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json; `tokens` gives bos_token_id and eos_token_id (the tokenizer's, as generation_config has
    them; Llama 2's 1 and 2 without one)."""
    tokens = tokens or {"bos_token_id": 1, "eos_token_id": 2}
    scaled = config.rope_scaling_factor is not None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; older versions read rope_theta and rope_scaling
        "rope_theta": config.rope_theta, "rope_parameters": hf_rope(config),
        **({"rope_scaling": {k: v for k, v in hf_rope(config).items() if k != "rope_theta"}} if scaled else {}),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,  # tied: no lm_head.weight in the files
        "bos_token_id": tokens["bos_token_id"], "eos_token_id": tokens["eos_token_id"],
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
    }


def export_weights(store: Store, out_dir: Path, dtype: str, max_shard_bytes: int, tensors=None) -> int:
    """model-0000N-of-0000M.safetensors + model.safetensors.index.json; `tensors` (name, array) pairs
    default to the store's own. Returns the total bytes written."""
    target = store_dtype(dtype)
    entries = []
    for kind, layer in TABLE.tensors(store.config):
        shape = kind.shape(store.config)
        entries.append((kind.hf_name(layer), target, shape[::-1] if kind.transposed else shape))
    shards = plan_shards(entries, max_shard_bytes)
    writers: dict[str, PlannedWriter] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = PlannedWriter(out_dir / file_name, shard, {"format": "pt"})
        for name, _, _ in shard:
            writers[name], weight_map[name] = writer, file_name
    source = tensors if tensors is not None else ((n, store.read(n)) for n, _ in store_tensors(store.config))
    for name, array in source:
        kind, layer = TABLE.by_store(name)
        if array.ndim == 2 and kind.transposed:
            array = array.T  # [in, out] -> transformers' [out, in]
        writers[kind.hf_name(layer)].write(kind.hf_name(layer), array)
    for writer in set(writers.values()):
        writer.close()
    total = sum(target.itemsize * int(np.prod(shape)) for _, _, shape in entries)
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return total


def export_tokenizer(tokenizer_model: Path, out_dir: Path) -> None:
    """tokenizer.model (for slow tokenizers), tokenizer.json and tokenizer_config.json; a Llama 3
    tokenizer (tiktoken file or tokenizer.json) goes to hf_tokenizer_export."""
    from transformers import AutoTokenizer

    from jora_model.data.tokenizer import Tokenizer
    from jora_model.data.tokenizer_files import SENTENCEPIECE, tokenizer_kind
    from jora_model.formats.hf_tokenizer_export import export_llama3_tokenizer

    if tokenizer_kind(tokenizer_model) != SENTENCEPIECE:
        return export_llama3_tokenizer(tokenizer_model, out_dir)
    bos_id = Tokenizer(tokenizer_model).bos_id
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
        converted = AutoTokenizer.from_pretrained(str(tmp))
        converted.save_pretrained(str(tmp / "out"))
        spec = json.loads((tmp / "out" / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    spec["post_processor"] = {  # bos first, as Llama's tokenizer adds it
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]}}}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000,
    }, indent=1) + "\n")


def check_tokenizer(out_dir: Path, tokenizer_model: Path) -> None:
    """AutoTokenizer on the export gives [bos] + our ids (hf_tokenizer_export checks the Llama 3 kinds)."""
    from transformers import AutoTokenizer

    from jora_model.data.tokenizer import Tokenizer
    from jora_model.data.tokenizer_files import SENTENCEPIECE, tokenizer_kind
    from jora_model.formats.hf_tokenizer_export import check_llama3_tokenizer

    if tokenizer_kind(tokenizer_model) != SENTENCEPIECE:
        return check_llama3_tokenizer(out_dir, tokenizer_model)
    ours = Tokenizer(tokenizer_model)
    theirs = AutoTokenizer.from_pretrained(str(out_dir))
    for text in TOKENIZER_CHECKS:
        expected = [ours.bos_id] + ours.encode(text)
        got = theirs(text)["input_ids"]
        if got != expected:
            raise JoraError(f"exported tokenizer disagrees with tokenizer.model on {text!r}: {got[:8]}... vs "
                            f"{expected[:8]}...", out_dir / "tokenizer.json")


def write_hf_directory(store_path: Path, out_dir: Path, dtype: str = "bf16",
                       max_shard_bytes: int = 2 * 1024 ** 3) -> dict[str, Any]:
    from jora_model.data.tokenizer import load_tokenizer
    from jora_model.formats.hf_tokenizer_export import generation_config

    store = Store(store_path)
    try:
        if store.tokenizer_path is None:
            raise JoraError("the store has no SentencePiece tokenizer, tiktoken file or tokenizer.json to export "
                            "(convert with --tokenizer)", store_path)
        tokenizer = load_tokenizer(store.tokenizer_path)
        torch_dtype = store_dtype(dtype).name
        generation = generation_config(tokenizer)
        (out_dir / "config.json").write_text(json.dumps(hf_config(store.config, torch_dtype, generation), indent=1)
                                             + "\n")
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
        total = export_weights(store, out_dir, dtype, max_shard_bytes)
        export_tokenizer(store.tokenizer_path, out_dir)
        check_tokenizer(out_dir, store.tokenizer_path)
        return {"bytes": total, "dtype": torch_dtype}
    finally:
        store.close()


def write_peft_adapter(adapter_path: Path, config: LlamaConfig, out_dir: Path, base_name: str = "") -> dict[str, Any]:
    """adapter_model.safetensors with PEFT's key names and [r, in] / [out, r] layouts, and
    adapter_config.json with r, lora_alpha, target_modules and use_rslora."""
    from jora_model.formats.adapter import load_adapter
    from jora_model.formats.safetensors_io import save_file

    params, lora, _ = load_adapter(adapter_path, config)
    tensors: dict[str, np.ndarray] = {}
    for module, leaves in sorted(params.items()):
        kind = TABLE.by_module(module)
        for layer in range(config.n_layers):
            for leaf in LORA_LEAVES:  # PEFT keeps both factors as torch Linear weights: [out, in]
                tensors[kind.peft_name(layer, leaf)] = np.ascontiguousarray(leaves[leaf][layer].T)
    save_file(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }, indent=1) + "\n")
    return {"r": lora.r, "lora_alpha": lora.alpha, "targets": list(lora.targets), "tensors": len(tensors)}


VERIFY_TOKENS = 256  # the oracle standard; enough positions for rotary (and its scaling) to show


def verify_tokens(vocab_size: int) -> np.ndarray:
    """A fixed sequence: long enough that rotary mistakes show (position 0 alone hides them)."""
    return (np.arange(VERIFY_TOKENS, dtype=np.int64) * 7919 + 11) % vocab_size


def hf_logits(model_dir: Path, tokens: np.ndarray, peft_dir: Path | None = None) -> np.ndarray:
    import warnings

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if peft_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(peft_dir))
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens[None])).logits[0].float().numpy()


def compare(ours: np.ndarray, theirs: np.ndarray, what: str, path: Path, tolerance: float) -> float:
    diff = float(np.max(np.abs(ours - theirs)))
    if not np.isfinite(diff) or diff > tolerance * max(1.0, float(np.max(np.abs(ours)))):
        raise JoraError(f"self-check failed: {what} differs from jora's own model by {diff:.3g} "
                        f"(tolerance {tolerance:g} x max|logit|); the export is wrong", path)
    return diff
