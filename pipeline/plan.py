"""`jora plan`: will a LoRA training run fit? Bytes per device from shapes alone (nothing is allocated).

Not a cached stage: it reads at most a store's `store.json` and writes nothing. The figures come from
jora_model.training.memory_plan; this module only parses options and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.training.settings import TrainSettings
from stages.options import option_for

_ROWS = (  # (label, MemoryPlan field)
    ("frozen weights", "frozen_bytes_per_device"),
    ("LoRA weights (fp32)", "lora_bytes_per_device"),
    ("optimizer state (AdamW, fp32)", "optimizer_bytes_per_device"),
    ("LoRA gradients (fp32)", "gradient_bytes_per_device"),
    ("layer weight copy (XLA CPU)", "weight_copy_bytes_per_device"),
    ("batch", "batch_bytes_per_device"),
)


def _gib(n: int) -> str:
    """GiB, or MiB below one GiB (a 32 MiB adapter is not '0.03 GiB')."""
    return f"{n / 2 ** 30:9.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:9.1f} MiB"


def _model(preset_name: str | None, store: Path | None):
    """(settings, stored dtype or None, what to call it)."""
    from jora_model.model.config import preset

    if (preset_name is None) == (store is None):
        raise JoraError("give exactly one of --preset NAME or --model STORE")
    if preset_name is not None:
        return preset(preset_name), None, preset_name
    from jora_model.formats.store import Store

    opened = Store(store)  # a missing or foreign directory is a JoraError naming it
    return opened.config, opened.dtype.name, str(store)


def _table(plan, title: str) -> str:
    lines = [title, f"{'':32s}{'per device':>13s}"]
    lines += [f"  {label:30s}{_gib(getattr(plan, field))}" for label, field in _ROWS
              if field != "weight_copy_bytes_per_device" or plan.weight_copy_bytes_per_device]
    lines.append(f"  {'activations (remat ' + plan.remat + ')':30s}{_gib(plan.activation_bytes_per_device)}")
    lines.append(f"  {'total':30s}{_gib(plan.total_bytes_per_device)}")
    others = [f"remat {policy}: {value / 2 ** 30:.2f} GiB" for policy, value in plan.activation_bytes_by_remat.items()
              if policy != plan.remat]
    lines.append(f"  (activations with {', '.join(others)})")
    if plan.fits is not None:
        lines.append(f"  fits in {plan.device_memory / 2 ** 30:.2f} GiB ({plan.device_memory:,} bytes): "
                     f"{'yes' if plan.fits else 'no'}")
    return "\n".join(lines)


@click.command("plan")
@click.option("--preset", "preset_name", default=None,
              help="7B, 13B, 70B, llama3-8B, llama3-70B, llama3.1-405B, llama3.2-1B, llama3.2-3B "
                   "(or tiny, small, base110m, small128k).")
@click.option("--model", "store", type=click.Path(path_type=Path), default=None,
              help="a parameter store (its settings and stored dtype).")
@click.option("--seq", type=click.IntRange(min=2), default=2000, show_default=True, help="tokens per row.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="rows per micro-batch, over the whole data axis.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="micro-batches per optimizer step.")
@click.option("--mesh", default="data=1,model=1", show_default=True, help="e.g. data=2,model=4.")
@option_for(LoraSettings, "r", dest="lora_r")
@option_for(LoraSettings, "targets")
@option_for(TrainSettings, "remat")
@option_for(TrainSettings, "kernels", note="a plan counts auto as cpu")  # it cannot see the platform it is for
@click.option("--param-dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="dtype of the frozen weights [default: the store's, or bfloat16].")
@click.option("--device-memory", default=None, help="memory per device, e.g. 80GB or 80GiB: says whether it fits.")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="with --device-memory: list the meshes over this many devices that fit, best first.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table.")
def plan_command(preset_name, store, seq, batch, grad_accum, mesh, lora_r, targets, remat, kernels, param_dtype,
                 device_memory, devices, as_json) -> None:
    """Bytes per device of LoRA training: frozen weights, LoRA, optimizer state, activations; and
    whether it fits. Computed from shapes: nothing is allocated."""
    from jora_model.training.memory_plan import meshes_that_fit, parse_bytes, plan_memory
    from jora_model.parallel.sharding import MeshShape

    config, stored_dtype, name = _model(preset_name, store)
    param_dtype = param_dtype or stored_dtype or "bfloat16"
    lora = LoraSettings(r=lora_r, alpha=lora_r, targets=targets)
    memory = parse_bytes(device_memory) if device_memory is not None else None
    common = dict(seq_len=seq, batch_size=batch, lora=lora, remat=remat, param_dtype=param_dtype,
                  grad_accum=grad_accum, kernels="cpu" if kernels == "auto" else kernels)
    if devices is not None:
        if memory is None:
            raise JoraError("--devices lists the meshes that fit: give --device-memory too")
        plans = meshes_that_fit(config, devices, device_memory=memory, **common)
        if as_json:
            click.echo(json.dumps({"model": name, "devices": devices, "device_memory": memory,
                                   "meshes": [p.to_dict() for p in plans]}))
            return
        if not plans:
            click.echo(f"{name}: no mesh over {devices} devices fits in {memory / 2 ** 30:.2f} GiB per device "
                       f"(seq {seq}, batch {batch})")
            return
        click.echo(f"{name}, seq {seq}, batch {batch}: meshes over {devices} devices that fit in "
                   f"{memory / 2 ** 30:.2f} GiB, best (most data parallelism) first")
        for p in plans:
            click.echo(f"  {str(p.mesh):20s} total {_gib(p.total_bytes_per_device)} per device")
        return
    plan = plan_memory(config, mesh=MeshShape.parse(mesh), device_memory=memory, **common)
    if as_json:
        click.echo(json.dumps({"model": name, **plan.to_dict()}))
        return
    click.echo(_table(plan, f"{name}: seq {seq}, batch {batch}, grad_accum {grad_accum}, mesh {plan.mesh}, "
                            f"LoRA r{lora_r} on {','.join(lora.targets)}, {param_dtype} weights"))
