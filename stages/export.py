"""Stage 5, export: a Hugging Face Llama directory (optionally with an adapter merged in) and a PEFT
adapter, each checked against jora's own model before it is reported finished.

Inputs: a parameter store, optionally an adapter. Outputs: an HF directory that
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load; or a PEFT adapter that
`PeftModel.from_pretrained(base, OUT)` loads. Cache key: the upstream keys, the settings and CODE_VERSION.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click

from jora_model.schema import check_settings, same_as, setting

from .base import StageResult, adapter_input, run_stage, upstream_key
from .convert import ConvertSettings
from .merge import ALLOW_OTHER_BASE
from .options import option_for, settings_options

CODE_VERSION = "export-1"
TOLERANCE = 1e-3  # of max|logit|: both sides compute in fp32 on identical weights


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
                   force: bool = False, allow_other_base: bool = False) -> StageResult:
    """Write `adapter` as a PEFT adapter for the HF export of `model`; an adapter trained on another base
    is refused unless `allow_other_base`."""
    from jora_model.formats.adapter import check_base
    from jora_model.formats.hf_export import compare, hf_logits, write_hf_directory, write_peft_adapter
    from jora_model.formats.store import Store

    model, out = Path(model), Path(out)
    adapter_path, adapter_hash = adapter_input(adapter)
    upstream = {"model": upstream_key(model, "parameter store"), "adapter": adapter_hash}
    check_base(adapter_path, model, upstream["model"], allow_other_base)

    def build(tmp: Path) -> dict:
        store = Store(model)
        config = store.config
        store.close()
        facts = write_peft_adapter(adapter_path, config, tmp, base_name=str(model.resolve()))
        if verify:
            with tempfile.TemporaryDirectory(prefix=".jora-base-", dir=out.absolute().parent) as scratch:
                base = Path(scratch)
                write_hf_directory(model, base, "fp32")
                tokens, ours = _our_logits(model, None, adapter_path)
                facts["max_abs_diff"] = compare(ours, hf_logits(base, tokens, peft_dir=tmp),
                                                "peft with the exported adapter", tmp, TOLERANCE)
        return facts

    return run_stage("export-adapter", CODE_VERSION, out, {}, {"verify": verify}, build, force=force,
                     upstream=upstream)


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
@option_for(ExportSettings, "verify", help="load it with peft on the exported base and compare logits.")
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
def export_adapter_command(model: Path, adapter: Path, out: Path, verify: bool, force: bool,
                           allow_other_base: bool) -> None:
    """Export ADAPTER as a PEFT adapter (adapter_config.json, adapter_model.safetensors) in OUT."""
    result = export_adapter(model, adapter, out, verify, force, allow_other_base)
    facts = result.manifest.get("facts", {})
    check = f", self-check max |diff| {facts['max_abs_diff']:.2g}" if "max_abs_diff" in facts else ""
    click.echo(f"{'skipped (up to date)' if result.skipped else 'exported'}: {result.out_dir}{check}")
