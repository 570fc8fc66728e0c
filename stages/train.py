"""Stage 3, train: LoRA training of the frozen base on tokenized shards, sharded over a device mesh.

Inputs: a parameter store (convert's output), tokenized shards (tokenize's output) and optionally an
adapter to warm-start from. Output: `adapter/` (adapter.safetensors + adapter.json), `metrics.jsonl`,
`tensorboard/`, `loss.png` and the last checkpoints. Cache key: the upstream outputs' keys, every
setting and CODE_VERSION. The work directory is kept across kills: the same command resumes.

Multi-host: every process runs the same command with --coordinator/--num-processes/--process-id (or
under SLURM/Open MPI with several tasks, JAX's own detection) and the same OUT on a shared filesystem.
The process count is not part of the cache key: the same inputs give the same adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from jora_model.model.remat import POLICIES

from .base import StageResult, adapter_input, run_stage, upstream_key

CODE_VERSION = "train-6"  # 2: LoRA dropout masks from a hash (jora_model/dropout.py), not threefry;
# 3: SwiGLU rounds to bf16 once (jora_model/norm_act.py) and attention sums its gradients in another order;
# 4: on the CPU, row reductions are XLA's own fusions, not YNNPACK's (jora_model/compiled.py): other sum orders
# 5: the adapter's gradients are summed in another order (jora_model/llama.py lora_update)
# 6: the loss head's softmax gradient reuses logsumexp's exponentials (jora_model/loss.py): other roundings
log = logging.getLogger("jora")


def train(model: str | Path, data: str | Path, out: str | Path, settings=None,
          init_adapter: str | Path | None = None, resume: bool = True, force: bool = False,
          on_metrics=None, progress: bool | None = None, warm_start: bool = False,
          distributed=None) -> StageResult:
    """Train a LoRA adapter into `out` (skipped when up to date; resumed when interrupted).

    warm_start: when `out` already holds an adapter from an earlier run and something changed (new
    data, say), start from that adapter. Unlike init_adapter, the earlier adapter is not part of the
    cache key, so an unchanged rerun still skips.

    distributed: a jora_model.parallel.distributed.DistributedSettings for a multi-host run; it is started
    here, before anything touches a device (None: one process, unless SLURM/Open MPI say otherwise)."""
    from jora_model.parallel import distributed as dist

    team = dist.initialize(distributed or dist.DistributedSettings())
    try:
        return _train(model, data, out, settings, init_adapter, resume, force, on_metrics, progress, warm_start,
                      team)
    except BaseException:
        dist.mark_failed()  # leave without waiting for peers at JAX's shutdown barrier
        raise


def _train(model, data, out, settings, init_adapter, resume, force, on_metrics, progress, warm_start,
           team) -> StageResult:
    from jora_model.training.trainer import TrainSettings, run_training

    settings = settings or TrainSettings()
    model, data, out = Path(model), Path(data), Path(out)
    upstream = {"model": upstream_key(model, "parameter store"),
                "data": upstream_key(data, "tokenized data directory")}
    adapter_in = None
    if init_adapter is not None:
        adapter_in, upstream["init_adapter"] = adapter_input(init_adapter)

    def build(work: Path) -> dict:
        import shutil

        if not resume and team.is_leader:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        start_from, facts = adapter_in, {}
        previous = out / "adapter"
        if warm_start and start_from is None and ((work / "warm-start") / "adapter.json").is_file():
            start_from = work / "warm-start"  # a resumed warm-started run: the copy made the first time
        elif warm_start and start_from is None and _compatible(previous, settings.lora):
            if team.is_leader:
                shutil.copytree(previous, work / "warm-start")  # `out` is replaced when this run finishes
            start_from = work / "warm-start"
        team.barrier("jora train: work prepared")
        if start_from is not None and warm_start:
            facts["warm_started_from"] = adapter_input(start_from)[1]
            log.info("train: warm start from the previous adapter (%s)", facts["warm_started_from"][:12])
        result = run_training(model, data, work, settings, base_hash=upstream["model"], init_adapter=start_from,
                              on_metrics=on_metrics, progress=progress)
        if team.is_leader:
            shutil.rmtree(work / "warm-start", ignore_errors=True)
        return {**facts, "steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                "resumed_from": result.resumed_from}

    key_settings = {**settings.to_dict(), **({"warm_start": True} if warm_start else {})}
    return run_stage("train", CODE_VERSION, out, {}, key_settings, build, force=force, upstream=upstream,
                     resumable=True, team=team)


def _compatible(previous: Path, lora) -> bool:
    """Whether an earlier adapter can seed this run (same rank and targets); says why not."""
    import json

    try:
        earlier = json.loads((previous / "adapter.json").read_text())["lora"]
    except (OSError, ValueError, KeyError):
        return False
    if earlier.get("r") != lora.r or tuple(earlier.get("targets", ())) != lora.targets:
        log.info("train: not warm-starting: the previous adapter has r=%s, targets %s", earlier.get("r"),
                 ",".join(earlier.get("targets", ())))
        return False
    return True


def _targets(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@click.command("train")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="parameter store (jora convert).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="tokenized shards (jora tokenize).")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale alpha/r).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--targets", default="q_proj,v_proj", show_default=True, callback=_targets,
              help="linear layers to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.")
@click.option("--rslora", is_flag=True, help="scale by alpha/sqrt(r) (rank-stabilised LoRA).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=8, show_default=True,
              help="micro-batches per optimizer step.")
@click.option("--max-seq-len", type=click.IntRange(min=8), default=2000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="stop after this many steps.")
@click.option("--seed", type=int, default=420, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="steps between evaluations on val/ (0: only at the end).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--mesh", default="", help="device mesh, e.g. data=2,model=4 [default: model=all devices].")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--remat", type=click.Choice(POLICIES), default="matmuls", show_default=True,
              help="what each decoder layer keeps for its backward pass: matmuls (every matmul's output; "
              "fastest), layer (its input and attention's output; least memory) or none (no recompute).")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1), default=0.03, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from the newest checkpoint of an interrupted run.")
@click.option("--init-adapter", type=click.Path(path_type=Path), default=None,
              help="warm-start from an earlier adapter (same rank and targets).")
@click.option("--force", is_flag=True, help="retrain even when the output is up to date.")
@click.option("--coordinator", envvar="JORA_COORDINATOR", default=None, metavar="HOST:PORT",
              help="multi-host: where process 0 serves JAX's coordination service [env JORA_COORDINATOR].")
@click.option("--num-processes", envvar="JORA_NUM_PROCESSES", type=click.IntRange(min=1), default=None,
              help="multi-host: processes in the run, one per host [env JORA_NUM_PROCESSES].")
@click.option("--process-id", envvar="JORA_PROCESS_ID", type=click.IntRange(min=0), default=None,
              help="multi-host: this process, 0..N-1; 0 writes the outputs [env JORA_PROCESS_ID].")
@click.option("--heartbeat-timeout", envvar="JORA_HEARTBEAT_TIMEOUT", type=click.IntRange(min=1), default=100,
              show_default=True, help="multi-host: seconds without a heartbeat before a process counts as dead.")
def train_command(model, data, out, lora_r, lora_alpha, lora_dropout, targets, rslora, lr, batch_size, grad_accum,
                  max_seq_len, epochs, max_steps, seed, eval_every, checkpoint_every, keep_checkpoints, mesh,
                  compute_dtype, remat, warmup_ratio, weight_decay, max_grad_norm, resume, init_adapter, force,
                  coordinator, num_processes, process_id, heartbeat_timeout):
    """Train a LoRA adapter on the base model in --model with the shards in --data, into OUT.

    On several hosts, run this same command on each (same OUT on a shared filesystem) with
    --coordinator, --num-processes and --process-id; see the README's "Several hosts"."""
    from jora_model.parallel.distributed import DistributedSettings
    from jora_model.model.lora import LoraSettings
    from jora_model.training.trainer import TrainSettings

    settings = TrainSettings(
        lora=LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets, rslora=rslora),
        lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len, epochs=epochs,
        max_steps=max_steps, seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, mesh=mesh, compute_dtype=compute_dtype, remat=remat,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    cluster = DistributedSettings(coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                                  heartbeat_timeout_s=heartbeat_timeout)
    result = train(model, data, out, settings, init_adapter=init_adapter, resume=resume, force=force,
                   distributed=cluster)
    facts = result.manifest.get("facts", {})
    verb = "skipped (up to date)" if result.skipped else "trained"
    eval_loss = facts.get("eval_loss")
    click.echo(f"{verb}: {result.out_dir / 'adapter'} ({facts.get('steps')} steps, final loss "
               f"{facts.get('final_loss') or float('nan'):.4f}"
               + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "") + ")")
