"""The Prefect flow `finetune`: convert -> tokenize -> train -> merge -> export (+ export-adapter).

Tasks pass paths, never arrays. Whether a stage runs is decided by the stage's own manifest (a content
hash of its inputs, settings and code version), not by Prefect's cache, which sees neither file
contents nor deleted outputs; every task therefore has caching off, and logs "skipped" when its stage
was up to date. The train task publishes the loss curve and final metrics as artifacts.

Several hosts: every process runs this same flow (train.coordinator/num_processes/process_id, or the
JORA_* variables, or SLURM/Open MPI). JAX's distributed runtime starts first; process 0 runs convert,
tokenize, merge and exports while the others wait and then find them up to date; all train together.

Bad input fails early and in one line: `preflight` checks what can be checked before any stage (and
`jora run` runs it, and takes the work directory's lock, before Prefect's temporary server starts), and
Prefect's own failure records for a JoraError lose their traceback (`_JoraErrorsInOneLine`).
"""


import os

# Nothing leaves the machine: set before Prefect is imported (a user's own settings win).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "jora")
# The "jora" logger (above) also logs outside flow runs (the demo's checkpoint, a stage command): that is
# not the mistake Prefect's "attempted to send logs to the API without a flow run id" warning is for.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Prefect gives its temporary local server 20 s to start; on a busy machine (seen at load 8 on 2 cores)
# that fails a whole run before any stage starts.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import base64  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from jora_model.parallel import distributed  # noqa: E402
from jora_model.errors import JoraError  # noqa: E402
from pipeline.settings import FinetuneSettings, build  # noqa: E402

LOCK = ".jora-run.lock"


def _jora_error_names(cls: type = JoraError) -> set[str]:
    return {cls.__name__}.union(*(_jora_error_names(sub) for sub in cls.__subclasses__()))


class _JoraErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its full traceback (the same error twice,
    about 80 lines), then each run's "Finished in state Failed(...)". For bad input (a JoraError) the
    message is the whole story: the traceback goes, and the records are marked `jora_error` so that a
    command that prints the error itself can keep them off its console (`errors_reported_by_caller`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, JoraError):
            record.exc_info, record.exc_text, record.jora_error = None, None, True
        elif exc is None and record.getMessage().startswith("Finished in state Failed("):
            # the state message names the exception's class: "... encountered an exception: JoraError: ..."
            record.jora_error = any(f"{name}: " in record.getMessage() for name in _jora_error_names())
        return True


class _DropJoraErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "jora_error", False)


class _DropTaskRunChatter(logging.Filter):
    """A task run's INFO records ("Finished in state Completed()", under "Task run 'train-dd3'") repeat
    the line its stage logged ("train: wrote ..."): the console names each stage once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "prefect.task_runs" and record.levelno < logging.WARNING)


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    # on the loggers, not their handlers: Prefect's logging setup replaces handlers, keeps logger filters
    logging.getLogger(_name).addFilter(_JoraErrorsInOneLine())


@contextlib.contextmanager
def errors_reported_by_caller():
    """While the flow runs, Prefect's console (root logger's handlers) leaves out the failure records of
    a JoraError: the caller (`jora run`) prints that error as its one line; and task runs' INFO records,
    which the stages' own lines already said. The API, and so the UI, still gets them all (JoraErrors
    without traceback)."""
    handlers, drops = list(logging.getLogger().handlers), (_DropJoraErrors(), _DropTaskRunChatter())
    for handler in handlers:
        for drop in drops:
            handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            for drop in drops:
                handler.removeFilter(drop)


def _log(result) -> dict[str, Any]:
    """A stage's summary for the flow's result. Nothing is logged here: the stage itself logged "STAGE:
    wrote ..." or "STAGE: skipped, ..." on the "jora" logger, which reaches the flow's log (and the UI)
    through PREFECT_LOGGING_EXTRA_LOGGERS; a second line here reported every stage twice."""
    return {"path": str(result.out_dir), "skipped": result.skipped, "key": result.key}


@task(name="convert", cache_policy=NO_CACHE)
def convert_task(checkpoint: str, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    from stages.convert import ConvertSettings, convert

    return _log(convert(checkpoint, out, ConvertSettings(**settings), progress=False))


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(data: str, out: str, tokenizer: str, settings: dict[str, Any]) -> dict[str, Any]:
    from stages.tokenize import TokenizeSettings, tokenize

    return _log(tokenize(data, out, tokenizer, TokenizeSettings(**settings)))


@task(name="train", cache_policy=NO_CACHE)
def train_task(model: str, data: str, out: str, settings: FinetuneSettings) -> dict[str, Any]:
    from jora_model.training.progress import LINES
    from stages.train import train

    # LINES: a log line every few steps; a bar's carriage returns would garble the flow's log
    result = train(model, data, out, train_settings(settings), warm_start=settings.train.warm_start,
                   progress=LINES, distributed=distributed_settings(settings))
    facts = result.manifest.get("facts", {})
    _publish_training(Path(result.out_dir), facts)
    return {**_log(result), **{k: facts.get(k) for k in ("steps", "final_loss", "eval_loss")}}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model: str, adapter: str | None, golden: str, out: str, tokenized: str,
                  settings: dict[str, Any]) -> dict[str, Any]:
    from stages.evaluate import EvaluateSettings, evaluate

    result = evaluate(model, golden, out, adapter=adapter, settings=EvaluateSettings(**settings), tokenized=tokenized)
    return {**_log(result), "report": json.loads((Path(result.out_dir) / "report.json").read_text())}


@task(name="merge", cache_policy=NO_CACHE)
def merge_task(model: str, adapter: str, out: str) -> dict[str, Any]:
    from stages.merge import merge

    return _log(merge(model, adapter, out, progress=False))


@task(name="export", cache_policy=NO_CACHE)
def export_task(model: str, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    from stages.export import ExportSettings, export

    s = ExportSettings(**settings)
    return _log(export(model, out, dtype=s.dtype, verify=s.verify, max_shard_bytes=s.max_shard_mb * 1024 ** 2))


@task(name="export-adapter", cache_policy=NO_CACHE)
def export_adapter_task(model: str, adapter: str, out: str, base_out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The PEFT adapter, after an HF export of the unmerged base (`base_out`) for its adapter_config.json to
    name: AutoPeftModelForCausalLM loads that, not jora's store. Both are cached stages of their own, and
    the adapter's key holds the base's build, so a rewritten base rewrites the adapter (the step "ran")."""
    from stages.export import ExportSettings, export, export_adapter

    s = ExportSettings(**settings)
    base = _log(export(model, base_out, dtype=s.dtype, verify=s.verify, max_shard_bytes=s.max_shard_mb * 1024 ** 2))
    summary = _log(export_adapter(model, adapter, out, s.verify, base_hf=base["path"]))
    return {**summary, "base": base}


def golden_set(settings: FinetuneSettings) -> str:
    """What the gate scores: eval.data, else the held-out split of the tokenize stage's output."""
    return settings.eval.data or str(Path(settings.workdir) / "tokenized")


def evaluation_settings(settings: FinetuneSettings):
    """The evaluate stage's settings: the eval section's, with the prompt template and length limit left to
    the tokenize output the flow passes (what training saw)."""
    from stages.evaluate import EvaluateSettings

    return build(EvaluateSettings, settings.eval)


def train_settings(settings: FinetuneSettings):
    from jora_model.model.lora import LoraSettings
    from jora_model.training.settings import TrainSettings

    return build(TrainSettings, settings.train, lora=build(LoraSettings, settings.lora),
                 max_seq_len=settings.data.max_seq_len)


def distributed_settings(settings: FinetuneSettings):
    """The multi-host part of the train settings; a field left empty is read from its environment
    variable, JORA_COORDINATOR, JORA_NUM_PROCESSES or JORA_PROCESS_ID (the process id differs per host,
    the YAML does not)."""
    from stages.train import HostSettings

    return build(HostSettings, settings.train, from_env=True).distributed()


def _leader_first(team, run_stage):
    """Process 0 runs a stage while the others wait; then they run it too and find it up to date
    (no device is touched on a skip), so every process returns the same summary."""
    if not team.several:
        return run_stage()
    if team.is_leader:
        summary = run_stage()
        team.barrier("jora flow: stage written")
        return summary
    team.barrier("jora flow: stage written")
    return run_stage()


def _publish_training(out: Path, facts: dict[str, Any]) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{k: r[k] for k in ("step", "loss", "eval_loss", "eval_perplexity") if k in r}
             for r in records if "eval_loss" in r]
    create_table_artifact(key="train-evaluations", table=evals or [{"step": 0}],
                          description="Evaluation loss by step")
    picture = base64.b64encode((out / "loss.png").read_bytes()).decode() if (out / "loss.png").is_file() else ""
    lines = ["# Training", "", f"- steps: {facts.get('steps')}", f"- final train loss: {facts.get('final_loss')}",
             f"- final eval loss: {facts.get('eval_loss')}", f"- resumed from step: {facts.get('resumed_from')}",
             f"- adapter: `{out / 'adapter'}`"]
    if picture:
        lines += ["", f"![loss curve](data:image/png;base64,{picture})"]
    create_markdown_artifact(key="train-summary", markdown="\n".join(lines), description="Loss curve and metrics")


class RunLock:
    """One pipeline run per work directory at a time: a second one is refused, never interleaved.
    In a multi-host run each process holds its own lock file (process 0: LOCK, others: LOCK.N).
    A lock `reserved` for this process's run (`jora run` takes it before the flow starts) is entered
    again by the flow without a second flock, which would refuse this very process."""

    _reserved: set[Path] = set()

    def __init__(self, workdir: Path, process_id: int = 0):
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = (workdir / (LOCK if process_id == 0 else f"{LOCK}.{process_id}")).resolve()
        self.handle = None

    def __enter__(self) -> "RunLock":
        if self.path in RunLock._reserved:
            return self
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise JoraError(f"another jora run ({holder}) is using this work directory; wait for it to end",
                            self.path.parent) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    @classmethod
    @contextlib.contextmanager
    def reserved(cls, workdir: Path, process_id: int = 0):
        """Hold the lock for the flow this process is about to run."""
        with cls(workdir, process_id) as lock:
            cls._reserved.add(lock.path)
            try:
                yield lock
            finally:
                cls._reserved.discard(lock.path)


def preflight(settings: FinetuneSettings) -> None:
    """What can be checked before any stage runs, so that it fails in a second rather than after the
    checkpoint's conversion: the paths, the checkpoint's layout, that the data file can be read, and
    a mesh this machine can hold. The stages check all of it again, and everything else."""
    from stages.convert import detect_layout

    if not settings.model.checkpoint:
        raise JoraError("settings: model.checkpoint is empty (a Meta or HF checkpoint directory)")
    if not settings.data.path:
        raise JoraError("settings: data.path is empty (an Alpaca JSON file)")
    detect_layout(Path(settings.model.checkpoint))
    if settings.model.tokenizer and not Path(settings.model.tokenizer).is_file():
        raise JoraError("tokenizer file not found", settings.model.tokenizer)
    data = Path(settings.data.path)
    if not data.is_file():
        raise JoraError("data file not found" if not data.exists() else "data path is not a file", data)
    try:
        with open(data, "rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        raise JoraError(f"data file cannot be read ({exc.strerror})", data) from None
    if empty:
        raise JoraError("data file is empty", data)
    _check_golden(settings)
    lineage_history(Path(settings.workdir) / LINEAGE)  # refuse now a lineage.json jora would not overwrite
    _check_mesh(settings)


def _check_golden(settings: FinetuneSettings) -> None:
    """The gate needs a golden set: eval.data, or the held-out split tokenize makes."""
    if not settings.eval.gate:
        return
    if settings.eval.data:
        from jora_model.evaluation.golden import golden_records

        golden = Path(settings.eval.data)
        if not golden.is_file():
            raise JoraError("golden set (eval.data) not found" if not golden.exists() else
                            "golden set (eval.data) is not a file", golden)
        golden_records(golden)
    elif settings.data.val_fraction == 0:
        raise JoraError("settings: the gate (eval.gate) needs a golden set: set eval.data, or data.val_fraction "
                        "above 0 for a held-out split, or eval.gate: false")


def _check_mesh(settings: FinetuneSettings) -> None:
    from jora_model.parallel.distributed import cluster_detected
    from jora_model.parallel.sharding import MeshShape

    if not settings.train.mesh:
        return  # the default mesh is made from whatever devices there are
    mesh = MeshShape.parse(settings.train.mesh)
    if settings.train.batch_size % mesh.data:
        raise JoraError(f"train.mesh {mesh}: batch size {settings.train.batch_size} is not a multiple of "
                        f"data={mesh.data}")
    hosts = distributed_settings(settings)
    if (hosts.explicit and hosts.num_processes != 1) or (not hosts.explicit and cluster_detected()):
        return  # JAX must not see a device before the multi-host runtime starts; train checks it then
    import jax

    if mesh.size != len(jax.devices()):
        raise JoraError(f"train.mesh {mesh} needs {mesh.size} devices, but {len(jax.devices())} are available")


def reserved_work_directory(settings: FinetuneSettings):
    """RunLock.reserved for this process's part of the run; nothing to hold when SLURM or Open MPI
    start it, whose process ids are known only once JAX starts (the flow's own lock then refuses a
    second run, later)."""
    from jora_model.parallel.distributed import cluster_detected

    hosts = distributed_settings(settings)
    if not hosts.explicit and cluster_detected():
        return contextlib.nullcontext()
    return RunLock.reserved(Path(settings.workdir), hosts.process_id or 0)


@flow(name="finetune", log_prints=True)
def finetune(settings: FinetuneSettings, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on the base model and data in `settings`, exporting HF and PEFT
    directories; stages whose inputs did not change are skipped. `overrides` maps dotted names to
    values (`{"data.path": "/new.json", "train.lr": 2e-4}`), for `prefect deployment run --param`."""
    from pipeline.deploy import tie_to_runner
    from stages.tokenize import TokenizeSettings

    tie_to_runner()  # a served run ends with its `jora deploy`
    jora_log = logging.getLogger("jora")
    if jora_log.level == logging.NOTSET:
        # The stages' lines ("train: wrote ...", progress) are this flow's log; left unset (a served run's
        # subprocess), the logger would take the root's WARNING and drop them before Prefect's API handler.
        # `jora run` sets INFO itself (-q quiets its console handler, not the logger).
        jora_log.setLevel(logging.INFO)
    if overrides:
        settings = apply_overrides(settings, overrides)
    work = Path(settings.workdir)
    preflight(settings)  # again: a deployment's run (and its overrides) got no check before
    tokenize_settings = dataclasses.asdict(build(TokenizeSettings, settings.data))
    team = distributed.initialize(distributed_settings(settings))  # before any stage touches a device
    try:
        stages, gate = _run_stages(settings, work, team, tokenize_settings)
    except BaseException:
        distributed.mark_failed()  # the other processes stop when this one does; no shutdown barrier
        raise
    ran = [name for name, s in stages.items() if not s["skipped"]]
    skipped = [name for name, s in stages.items() if s["skipped"]]
    create_markdown_artifact(key="finetune-stages", markdown="\n".join(
        ["# Stages", "", *(f"- **{name}**: {'skipped (up to date)' if s['skipped'] else 'ran'} -> `{s['path']}`"
                           + (f" (base: `{s['base']['path']}`)" if "base" in s else "")
                           for name, s in stages.items())]))
    # counts, not names: each stage's own line named it, and the finetune-stages artifact lists them
    get_run_logger().info("%d of %d stages ran, %d were up to date", len(ran), len(stages), len(skipped))
    from stages.base import output_key

    def published(name: str) -> str | None:  # this run's, or (the gate held it back) the one before's
        return str(work / name) if output_key(work / name) is not None else None

    return {"stages": stages, "gate": gate, "hf_model": published("hf-model"),
            "adapter": str(Path(stages["train"]["path"]) / "adapter"),
            "peft_adapter": published("peft-adapter") if settings.export.peft_adapter else None,
            "hf_base": published("hf-base") if settings.export.peft_adapter else None}


def _run_stages(settings: FinetuneSettings, work: Path, team, tokenize_settings: dict[str, Any]) -> dict[str, Any]:
    from stages.convert import ConvertSettings
    from stages.export import ExportSettings

    data = settings.data
    convert_settings = dataclasses.asdict(build(ConvertSettings, settings.model))
    export_settings = dataclasses.asdict(build(ExportSettings, settings.export))
    with RunLock(work, team.process_id):
        stages: dict[str, Any] = {}
        stages["convert"] = _leader_first(team, lambda: convert_task(
            settings.model.checkpoint, str(work / "store"), convert_settings))
        store = stages["convert"]["path"]
        stages["tokenize"] = _leader_first(team, lambda: tokenize_task(data.path, str(work / "tokenized"), store,
                                                                       tokenize_settings))
        stages["train"] = train_task(store, stages["tokenize"]["path"], str(work / "train"), settings)
        gate = _leader_first(team, lambda: _gate(settings, work, store, stages)) if settings.eval.gate else None
        if gate is None or gate["decision"]["promote"]:
            _publish(settings, work, store, stages, team, export_settings)
        if team.is_leader:
            _write_lineage(work, settings, stages, gate)
    return stages, gate


def _publish(settings: FinetuneSettings, work: Path, store: str, stages: dict[str, Any], team,
             export_settings: dict[str, Any]) -> None:
    """merge and the exports: what a promoted adapter replaces."""
    stages["merge"] = _leader_first(team, lambda: merge_task(store, stages["train"]["path"], str(work / "merged")))
    stages["export"] = _leader_first(team, lambda: export_task(
        stages["merge"]["path"], str(work / "hf-model"), export_settings))
    if settings.export.peft_adapter:
        stages["export-adapter"] = _leader_first(team, lambda: export_adapter_task(
            store, stages["train"]["path"], str(work / "peft-adapter"), str(work / "hf-base"), export_settings))


def _gate(settings: FinetuneSettings, work: Path, store: str, stages: dict[str, Any]) -> dict[str, Any]:
    """Score the new adapter and what is published now (the merged model; on a first run, the base model)
    on the same golden set, and decide. The evaluations are stages (cached) in work/evaluate/ and
    work/evaluate-published/ (or evaluate-base/); the decision is logged, published as a table artifact
    and returned with both reports for the lineage."""
    from jora_model.evaluation.gate import GateSettings, already_published, decide
    from stages.base import adapter_input, output_key
    from stages.merge import merged_adapter

    golden, tokenized = golden_set(settings), stages["tokenize"]["path"]
    evaluation = dataclasses.asdict(evaluation_settings(settings))
    stages["evaluate"] = evaluate_task(store, stages["train"]["path"], golden, str(work / "evaluate"), tokenized,
                                       evaluation)
    published = work / "merged"
    if merged_adapter(published) == adapter_input(stages["train"]["path"])[1]:
        # what is published is this very adapter: nothing to compare (a rerun on unchanged data)
        decision = already_published(stages["evaluate"]["report"], settings.eval.metric)
        return {"decision": decision.to_dict(), "new": stages["evaluate"]["path"], "published": None,
                "reports": {"new": stages["evaluate"]["report"], "published": None}}
    if output_key(published) is not None:
        against, name = "published model", "evaluate-published"
        stages[name] = evaluate_task(str(published), None, golden, str(work / name), tokenized, evaluation)
    else:  # nothing published yet: the new adapter must at least not answer worse than the base model
        against, name = "base model", "evaluate-base"
        stages[name] = evaluate_task(store, None, golden, str(work / name), tokenized, evaluation)
    decision = decide(stages["evaluate"]["report"], stages[name]["report"], build(GateSettings, settings.eval),
                      against)
    (get_run_logger().info if decision.promote else get_run_logger().warning)("gate: %s", decision.reason)
    _publish_gate(stages["evaluate"]["report"], stages[name]["report"], against, decision)
    return {"decision": decision.to_dict(), "new": stages["evaluate"]["path"], "published": stages[name]["path"],
            "reports": {"new": stages["evaluate"]["report"], "published": stages[name]["report"]}}


def _publish_gate(new: dict[str, Any], published: dict[str, Any], against: str, decision) -> None:
    def row(model: str, report: dict[str, Any]) -> dict[str, Any]:
        figures = {k: report.get(k) for k in ("n", "exact_match", "token_f1", "loss", "perplexity")}
        no_context = report.get("no_context") or {}
        return {"model": model, **figures, "exact_match without context": no_context.get("exact_match"),
                "token_f1 without context": no_context.get("token_f1")}

    create_table_artifact(key="evaluation-gate", table=[row("new adapter", new), row(against, published)],
                          description=decision.reason)


def apply_overrides(settings: FinetuneSettings, overrides: dict[str, Any]) -> FinetuneSettings:
    from pydantic import ValidationError

    from pipeline.settings import set_dotted

    values = settings.model_dump()
    for dotted, value in overrides.items():
        set_dotted(values, dotted, value)
    try:
        return FinetuneSettings.model_validate(values)
    except ValidationError as exc:
        raise JoraError(f"bad override: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


LINEAGE = "lineage.json"
LINEAGE_FORMAT = "jora-lineage"
# The keys of the one record a lineage.json held before it kept every run's: such a file is jora's too.
_SINGLE_RECORD = {"data", "base_model", "settings", "code_versions", "stage_keys"}


def lineage_history(path: Path) -> list[dict[str, Any]]:
    """The runs `path` records, oldest first ([] when there is no file). A file jora did not write
    (no "format": "jora-lineage", nor the single record of earlier versions) is refused, not replaced."""
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JoraError(f"cannot read it ({exc.strerror})", path) from None
    except ValueError:
        lineage = None
    if isinstance(lineage, dict) and lineage.get("format") == LINEAGE_FORMAT and isinstance(lineage.get("runs"), list):
        return lineage["runs"]
    if isinstance(lineage, dict) and "format" not in lineage and _SINGLE_RECORD <= lineage.keys():
        return [lineage]
    raise JoraError("not a lineage file jora wrote; refusing to overwrite it (move it away or use another "
                    "workdir)", path)


def _write_lineage(work: Path, settings: FinetuneSettings, stages: dict[str, Any],
                   gate: dict[str, Any] | None = None) -> None:
    """Append what this run's outputs were made from (data hash, base model, settings, code versions,
    losses) to the work directory's history, so that two runs' adapters can be compared."""
    import datetime

    from stages.base import file_sha256, read_manifest
    from stages.convert import CODE_VERSION as convert_version
    from stages.export import CODE_VERSION as export_version
    from stages.merge import CODE_VERSION as merge_version
    from stages.tokenize import CODE_VERSION as tokenize_version
    from stages.train import CODE_VERSION as train_version

    path = work / LINEAGE
    history = lineage_history(path)  # before any work: a foreign file stays as it was
    train_facts = (read_manifest(Path(stages["train"]["path"])) or {}).get("facts", {})
    history.append({
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ran": [name for name, s in stages.items() if not s["skipped"]],
        "data": {"path": settings.data.path, "sha256": file_sha256(Path(settings.data.path))},
        "base_model": {"checkpoint": settings.model.checkpoint, "store_key": stages["convert"]["key"]},
        "settings": settings.model_dump(),
        "code_versions": [convert_version, tokenize_version, train_version, merge_version, export_version],
        "stage_keys": {name: s["key"] for name, s in stages.items()},
        "warm_started_from": train_facts.get("warm_started_from"),
        "train": {k: train_facts.get(k) for k in ("steps", "final_loss", "eval_loss")},
        "gate": gate,
    })
    # written whole, then renamed: a run killed here leaves the earlier history, never half of it
    partial = path.with_name(f".{LINEAGE}.partial")
    partial.write_text(json.dumps({"format": LINEAGE_FORMAT, "runs": history}, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)
