"""Stage 4, merge: fold a trained adapter into the base weights, giving a new parameter store.

Inputs: a parameter store and an adapter (train's output or its adapter/ directory). Output: a
parameter store in the base's dtype. Cache key: both upstream keys and CODE_VERSION.
"""

from __future__ import annotations

from pathlib import Path

import click

from .base import StageResult, adapter_input, run_stage, upstream_key

CODE_VERSION = "merge-1"
# The help of --allow-other-base on every command that applies an adapter (merge, export, generate).
ALLOW_OTHER_BASE = "use the adapter even though it was trained on another base store."


def merge(model: str | Path, adapter: str | Path, out: str | Path, force: bool = False,
          progress: bool | None = None, allow_other_base: bool = False) -> StageResult:
    """Merge `adapter` into the store `model`; refused when the adapter was trained on another base,
    unless `allow_other_base`."""
    from jora_model.formats.adapter import check_base
    from jora_model.formats.merge import merge_store

    model, out = Path(model), Path(out)
    adapter, adapter_hash = adapter_input(adapter)
    upstream = {"model": upstream_key(model, "parameter store"), "adapter": adapter_hash}
    check_base(adapter, model, upstream["model"], allow_other_base)

    def build(tmp: Path) -> dict:
        merge_store(model, adapter, tmp, extra={"merged": {"base": upstream["model"], "adapter": upstream["adapter"]}},
                    progress=progress)
        return {"base": str(model.resolve()), "adapter": str(adapter.resolve())}

    return run_stage("merge", CODE_VERSION, out, {}, {}, build, force=force, upstream=upstream)


def merged_adapter(store: Path) -> str | None:
    """The hash of the adapter a merged store (merge's output) holds, or None for any other store."""
    import json

    try:
        merged = json.loads((Path(store) / "store.json").read_text()).get("merged")
    except (OSError, ValueError):
        return None
    return merged.get("adapter") if isinstance(merged, dict) else None


@click.command("merge")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="parameter store.")
@click.option("--adapter", "adapter", required=True, type=click.Path(path_type=Path),
              help="a train output or its adapter/ directory.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
def merge_command(model: Path, adapter: Path, out: Path, force: bool, allow_other_base: bool) -> None:
    """Fold the LoRA adapter into the base weights of --model, writing a new parameter store OUT."""
    result = merge(model, adapter, out, force=force, allow_other_base=allow_other_base)
    click.echo(f"{'skipped (up to date)' if result.skipped else 'merged'}: {result.out_dir}")
