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

import dataclasses
import logging
from pathlib import Path

import click

from jora_model.schema import check_settings, setting
from jora_model.training.settings import TrainSettings

from .base import StageResult, adapter_input, run_stage, upstream_key
from .options import settings_options

# Part of the cache key: bumped whenever the same inputs would train a different adapter, so a cached
# one is never taken for what this code trains (benchmarks/RESULTS.md lists what each bump changed).
CODE_VERSION = "train-6"
log = logging.getLogger("jora")


@dataclasses.dataclass(frozen=True)
class HostSettings:
    """Which processes train together on several hosts (README "Several hosts"). Not part of the cache
    key: the same inputs give the same adapter on any number of hosts."""
    coordinator: str | None = setting(None, "several hosts: HOST:PORT where process 0 serves JAX's coordination "
                                      "service", env="JORA_COORDINATOR", metavar="HOST:PORT")
    num_processes: int | None = setting(None, "several hosts: processes in the run, one per host", ge=1,
                                        env="JORA_NUM_PROCESSES")
    process_id: int | None = setting(None, "several hosts: this process, 0..N-1; 0 writes the outputs", ge=0,
                                     env="JORA_PROCESS_ID")
    heartbeat_timeout: int = setting(100, "several hosts: seconds without a heartbeat before a process counts as "
                                     "dead and all stop", ge=1, env="JORA_HEARTBEAT_TIMEOUT")

    def __post_init__(self) -> None:
        check_settings(self)

    def distributed(self):
        """As jora_model.parallel.distributed takes them (which checks that they agree)."""
        from jora_model.parallel.distributed import DistributedSettings

        return DistributedSettings(coordinator=self.coordinator, num_processes=self.num_processes,
                                   process_id=self.process_id, heartbeat_timeout_s=self.heartbeat_timeout)


def train(model: str | Path, data: str | Path, out: str | Path, settings=None,
          init_adapter: str | Path | None = None, resume: bool = True, force: bool = False,
          on_metrics=None, progress: bool | str | None = None, warm_start: bool = False,
          distributed=None) -> StageResult:
    """Train a LoRA adapter into `out` (skipped when up to date; resumed when interrupted).

    on_metrics: called with each step's metrics record. progress: a bar (True), none (False), a bar on a
    terminal (None), or "lines" (jora_model.training.progress.LINES): a log line every few steps.

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
    from jora_model.backends import resolve_kernels
    from jora_model.training.stop import TrainingDiverged
    from jora_model.training.trainer import run_training

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
        try:
            result = run_training(model, data, work, settings, base_hash=upstream["model"],
                                  init_adapter=start_from, on_metrics=on_metrics, progress=progress)
        except TrainingDiverged as exc:  # the line names the output the run was for
            raise TrainingDiverged(str(exc), exc.onset, out) from None
        if team.is_leader:
            shutil.rmtree(work / "warm-start", ignore_errors=True)
        return {**facts, "steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                "resumed_from": result.resumed_from}

    # The resolved kernel set, not "auto": cpu and portable kernels round differently, so a work directory
    # moved from a CPU host to a GPU host must retrain rather than take the other set's adapter as its own.
    # divergence_check is left out: it stops a run or lets it go on, never changes the adapter a run makes,
    # so turning it off resumes the same run instead of starting another.
    key_settings = {**settings.to_dict(), "kernels": resolve_kernels(settings.kernels),
                    **({"warm_start": True} if warm_start else {})}
    key_settings.pop("divergence_check", None)
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


@click.command("train")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="parameter store (jora convert).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="tokenized shards (jora tokenize).")
@click.argument("out", type=click.Path(path_type=Path))
@settings_options(TrainSettings, "settings")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from the newest checkpoint of an interrupted run.")
@click.option("--init-adapter", type=click.Path(path_type=Path), default=None,
              help="warm-start from an earlier adapter (same rank and targets).")
@click.option("--force", is_flag=True, help="retrain even when the output is up to date.")
@settings_options(HostSettings, "hosts")
def train_command(model, data, out, settings, resume, init_adapter, force, hosts):
    """Train a LoRA adapter on the base model in --model with the shards in --data, into OUT.

    On several hosts, run this same command on each (same OUT on a shared filesystem) with
    --coordinator, --num-processes and --process-id; see the README's "Several hosts"."""
    result = train(model, data, out, settings, init_adapter=init_adapter, resume=resume, force=force,
                   distributed=hosts.distributed())
    facts = result.manifest.get("facts", {})
    verb = "skipped (up to date)" if result.skipped else "trained"
    eval_loss = facts.get("eval_loss")
    click.echo(f"{verb}: {result.out_dir / 'adapter'} ({facts.get('steps')} steps, final loss "
               f"{facts.get('final_loss') or float('nan'):.4f}"
               + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "") + ")")
