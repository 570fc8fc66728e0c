"""Stage 5, export: a Hugging Face Llama directory (optionally with an adapter merged in) and a PEFT
adapter, each checked against jora's own model before it is reported finished.

Inputs: a parameter store, optionally an adapter. Outputs: an HF directory that
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load; or a PEFT adapter that
`PeftModel.from_pretrained(base, OUT)` loads, and, given an HF export of its base (--base-hf) to name,
`AutoPeftModelForCausalLM.from_pretrained(OUT)` too. Cache key: the upstream keys, the settings and CODE_VERSION.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path

import click

from jora_model.errors import JoraError
from jora_model.schema import check_settings, same_as, setting

from .base import StageResult, adapter_input, output_key, read_manifest, run_stage, upstream_key
from .convert import ConvertSettings
from .merge import ALLOW_OTHER_BASE
from .options import option_for, settings_options

CODE_VERSION = "export-1"
TOLERANCE = 1e-3  # of max|logit|: both sides compute in fp32 on identical weights
log = logging.getLogger("jora")


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How `jora export` writes the Hugging Face directory (and whether each export is checked)."""
    dtype: str = same_as(ConvertSettings, "dtype", help="dtype of the exported Hugging Face weights")
    verify: bool = setting(True, "check each export's logits against jora's own model (needs the model in host RAM)")
    max_shard_mb: int = setting(2048, "split model-*.safetensors at about this many MiB", ge=1,
                                option="--max-shard-size")

    def __post_init__(self) -> None:
        check_settings(self)


def _our_logits(store: Path, dtype: str | None = None, adapter: Path | None = None):
    import jax
    import numpy as np

    from jora_model import load_model
    from jora_model.formats.hf_export import verify_tokens
    from jora_model.formats.store import store_dtype

    model = load_model(store, dtype="float32", adapter=adapter)
    if dtype is not None:  # the export rounds to its dtype: compare on the same weights
        target = store_dtype(dtype)
        model.params = jax.tree.map(
            lambda x: x if str(x.dtype) == "float32" and adapter is not None else x.astype(target), model.params)
    tokens = verify_tokens(model.config.vocab_size)
    return tokens, np.asarray(model.logits(tokens[None]))[0]


def export(model: str | Path, out: str | Path, adapter: str | Path | None = None, dtype: str = "bf16",
           verify: bool = True, max_shard_bytes: int = 2 * 1024 ** 3, force: bool = False,
           allow_other_base: bool = False) -> StageResult:
    """Write the store in `model` (with `adapter` merged in, when given) as an HF directory in `out`;
    an adapter trained on another base is refused unless `allow_other_base`."""
    from jora_model.formats.adapter import check_base
    from jora_model.formats.hf_export import compare, hf_logits, write_hf_directory
    from jora_model.formats.merge import merge_store
    from jora_model.formats.store import store_dtype

    model, out = Path(model), Path(out)
    store_dtype(dtype)
    upstream = {"model": upstream_key(model, "parameter store")}
    adapter_path = None
    if adapter is not None:
        adapter_path, upstream["adapter"] = adapter_input(adapter)
        check_base(adapter_path, model, upstream["model"], allow_other_base)
    settings = {"dtype": dtype, "verify": verify, "max_shard_bytes": max_shard_bytes}

    def build(tmp: Path) -> dict:
        facts: dict = {}
        with tempfile.TemporaryDirectory(prefix=".jora-merge-", dir=out.absolute().parent) as scratch:
            source = model
            if adapter_path is not None:  # merge first, so the check compares identical weights
                source = Path(scratch) / "merged"
                source.mkdir()
                merge_store(model, adapter_path, source)
            facts.update(write_hf_directory(source, tmp, dtype, max_shard_bytes))
            if verify:
                tokens, ours = _our_logits(source, dtype)
                facts["max_abs_diff"] = compare(ours, hf_logits(tmp, tokens), "transformers on the export",
                                                tmp, TOLERANCE)
        return facts

    return run_stage("export", CODE_VERSION, out, {}, settings, build, force=force, upstream=upstream)


def export_adapter(model: str | Path, adapter: str | Path, out: str | Path, verify: bool = True,
                   force: bool = False, allow_other_base: bool = False,
                   base_hf: str | Path | None = None) -> StageResult:
    """Write `adapter` as a PEFT adapter for the HF export of `model`; an adapter trained on another base
    is refused unless `allow_other_base`. `base_hf`, an HF export of `model`, is what adapter_config.json
    names as the base (AutoPeftModelForCausalLM loads it); without it the store's own path is written."""
    from jora_model.formats.adapter import check_base
    from jora_model.formats.hf_export import write_peft_adapter
    from jora_model.formats.store import Store

    model, out = Path(model), Path(out)
    adapter_path, adapter_hash = adapter_input(adapter)
    upstream = {"model": upstream_key(model, "parameter store"), "adapter": adapter_hash}
    check_base(adapter_path, model, upstream["model"], allow_other_base)
    store = Store(model)
    config, store_dtype_name = store.config, store.dtype.name
    store.close()
    if base_hf is not None:
        base_hf = Path(base_hf).resolve()
        upstream["base_hf"] = check_base_hf(base_hf, model, upstream["model"], config)
    # the name is written into adapter_config.json, so where the base lives is part of the result
    base_name = str(base_hf if base_hf is not None else model.resolve())

    def build(tmp: Path) -> dict:
        facts = write_peft_adapter(adapter_path, config, tmp, base_name=base_name)
        if verify:
            facts["max_abs_diff"] = _check_peft(model, adapter_path, tmp, out, base_hf, store_dtype_name)
        return facts

    result = run_stage("export-adapter", CODE_VERSION, out, {}, {"verify": verify, "base_model": base_name}, build,
                       force=force, upstream=upstream)
    if base_hf is None and not result.skipped:  # once, when written; a failed export says only why it failed
        log.warning("%s: base_model_name_or_path is the parameter store %s, which transformers cannot load, so "
                    "AutoPeftModelForCausalLM.from_pretrained fails (PeftModel on an HF base works); write the "
                    "base with `jora export %s HF_DIR` and pass --base-hf HF_DIR", out, base_name, model)
    return result


def _check_peft(model: Path, adapter: Path, peft_dir: Path, out: Path, base_hf: Path | None,
                store_dtype_name: str) -> float:
    """peft's logits with the written adapter against ours. On `base_hf` itself when it holds the store's
    own dtype (the same weights as ours, and the base users will load); otherwise on a scratch fp32
    export, since a base rounded to another dtype would differ by more than the tolerance."""
    from jora_model.formats.hf_export import compare, hf_logits, write_hf_directory

    what = "peft with the exported adapter"
    tokens, ours = _our_logits(model, None, adapter)
    if base_hf is not None and _hf_dtype(base_hf) == store_dtype_name:
        return compare(ours, hf_logits(base_hf, tokens, peft_dir=peft_dir), f"{what} on {base_hf}", out,
                       TOLERANCE)
    with tempfile.TemporaryDirectory(prefix=".jora-base-", dir=out.absolute().parent) as scratch:
        write_hf_directory(model, Path(scratch), "fp32")
        return compare(ours, hf_logits(Path(scratch), tokens, peft_dir=peft_dir), what, out, TOLERANCE)


# What makes two Llama configs the same model; other keys (dtype, token ids, rotary spelling) may differ.
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _hf_config_json(base_hf: Path) -> dict:
    if not base_hf.is_dir():
        raise JoraError("--base-hf: not a directory (give an HF export of the base, from `jora export`)", base_hf)
    try:
        config = json.loads((base_hf / "config.json").read_text())
    except FileNotFoundError:
        raise JoraError("--base-hf: not a Hugging Face model directory (no config.json)", base_hf) from None
    except (OSError, ValueError):
        raise JoraError("--base-hf: config.json cannot be read", base_hf / "config.json") from None
    if not isinstance(config, dict):
        raise JoraError("--base-hf: config.json is not a JSON object", base_hf / "config.json")
    return config


def _hf_dtype(base_hf: Path) -> str | None:
    config = _hf_config_json(base_hf)
    return config.get("dtype") or config.get("torch_dtype")


def check_base_hf(base_hf: Path, model: Path, store_key: str, config) -> str:
    """Refuse a `base_hf` that is not an HF export of the store `model` (whose key is `store_key`): its
    config.json must describe the same model and, when jora wrote it, its manifest must name this store
    and no merged adapter (config.json alone cannot tell a merged export from the base). Returns its
    identity for the cache key."""
    from jora_model.formats.hf_export import hf_config

    theirs, ours = _hf_config_json(base_hf), hf_config(config, "float32")
    hidden, heads = theirs.get("hidden_size"), theirs.get("num_attention_heads")
    defaults = {"num_key_value_heads": heads, "tie_word_embeddings": False,  # transformers' defaults
                "head_dim": hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None}
    differ = [f"{k} {theirs.get(k, defaults.get(k))!r} (the store's {ours[k]!r})" for k in _SHAPE_KEYS
              if theirs.get(k, defaults.get(k)) != ours[k]]
    if differ:
        raise JoraError(f"--base-hf is not an export of {model}: its config.json has {', '.join(differ)}", base_hf)
    manifest = read_manifest(base_hf)
    if manifest is None:  # a directory jora did not write (the HF checkpoint the store came from, say)
        files = sorted((p.name, p.stat().st_size) for p in base_hf.iterdir() if p.is_file())
        return hashlib.sha256((base_hf / "config.json").read_bytes() + json.dumps(files).encode()).hexdigest()
    inputs = manifest.get("inputs", {})
    recorded = str(inputs.get("model", {}).get("sha256", ""))
    if manifest.get("stage") != "export" or "adapter" in inputs:
        raise JoraError(f"--base-hf is a jora {manifest.get('stage')!r} output"
                        f"{' with an adapter merged in' if 'adapter' in inputs else ''}, not an export of the "
                        f"base; write one with `jora export {model} DIR`", base_hf)
    if recorded.split(".")[0] != store_key.split(".")[0]:  # the stage key, not the build (as check_base)
        raise JoraError(f"--base-hf is an export of another parameter store ({recorded[:16]}), not of {model} "
                        f"({store_key[:16]}); write one with `jora export {model} DIR`", base_hf)
    return output_key(base_hf) or recorded


@click.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="merge this adapter (a train output or its adapter/) into the export.")
@settings_options(ExportSettings, "settings")
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
def export_command(model: Path, out: Path, adapter: Path | None, settings: ExportSettings, force: bool,
                   allow_other_base: bool) -> None:
    """Export the parameter store MODEL (plus --adapter, merged) as a Hugging Face directory OUT."""
    result = export(model, out, adapter, settings.dtype, settings.verify, settings.max_shard_mb * 1024 ** 2, force,
                    allow_other_base)
    facts = result.manifest.get("facts", {})
    check = f", self-check max |diff| {facts['max_abs_diff']:.2g}" if "max_abs_diff" in facts else ""
    click.echo(f"{'skipped (up to date)' if result.skipped else 'exported'}: {result.out_dir}{check}")


@click.command("export-adapter")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="the base parameter store.")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--base-hf", type=click.Path(path_type=Path), default=None,
              help="an HF export of the base (`jora export STORE DIR`) for adapter_config.json to name, so that "
                   "AutoPeftModelForCausalLM.from_pretrained(OUT) loads; without it the store's path is named.")
@option_for(ExportSettings, "verify", help="load it with peft on the exported base and compare logits.")
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
def export_adapter_command(model: Path, adapter: Path, out: Path, base_hf: Path | None, verify: bool, force: bool,
                           allow_other_base: bool) -> None:
    """Export ADAPTER as a PEFT adapter (adapter_config.json, adapter_model.safetensors) in OUT."""
    result = export_adapter(model, adapter, out, verify, force, allow_other_base, base_hf)
    facts = result.manifest.get("facts", {})
    check = f", self-check max |diff| {facts['max_abs_diff']:.2g}" if "max_abs_diff" in facts else ""
    click.echo(f"{'skipped (up to date)' if result.skipped else 'exported'}: {result.out_dir}{check}")
