"""The pipeline's settings: one typed object (the Prefect UI renders a form for it), loadable from YAML.

Every field is documented in pipeline/finetune.example.yaml. Relative paths in a YAML file are taken
relative to that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jora_model.errors import JoraError
from jora_model.model.remat import POLICIES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    checkpoint: str = Field("", description="Meta's checkpoint directory or an HF Llama directory")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of the converted weights")
    tokenizer: str | None = Field(None, description="tokenizer.model, when the checkpoint has none")


class DataSection(_Section):
    path: str = Field("", description="Alpaca JSON or JSON Lines; `input` carries the retrieved context")
    max_seq_len: int = Field(2000, ge=8, description="longest example in tokens (context is cut first)")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of records held out for evaluation")
    seed: int = Field(420, description="decides the held-out records")
    pack: bool = Field(False, description="pack several short examples per row")
    strict: bool = Field(True, description="stop at a bad record (false: skip and count it)")


class LoraSection(_Section):
    r: int = Field(16, ge=1, description="rank")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input while training")
    targets: list[str] = Field(["q_proj", "v_proj"], description="linear layers that get an adapter")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r)")


class TrainSection(_Section):
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(1, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(8, ge=1, description="micro-batches per optimizer step")
    epochs: int = Field(7, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    seed: int = Field(420, description="data order, adapter init, dropout")
    eval_every: int = Field(100, ge=0, description="steps between evaluations (0: only at the end)")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    mesh: str = Field("", description="device mesh, e.g. data=2,model=4 (empty: model = all devices)")
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    remat: Literal[POLICIES] = Field("matmuls", description="what each decoder layer keeps for its backward pass: "
                                     "matmuls (fastest), layer (least memory), none (no recompute)")

    @field_validator("remat", mode="before")
    @classmethod
    def _remat_from_bool(cls, value: Any) -> Any:
        # settings files written before the policies said `remat: true` or `false`
        return {True: "matmuls", False: "none"}[value] if isinstance(value, bool) else value
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warm_start: bool = Field(False, description="start from the previous run's adapter when the data changed")
    # Multi-host (README "Several hosts"): every process runs the same flow; none of these is part of
    # the train stage's cache key, so the same inputs give the same adapter on any number of hosts.
    coordinator: str | None = Field(None, description="HOST:PORT of process 0 (env JORA_COORDINATOR)")
    num_processes: int | None = Field(None, ge=1, description="processes, one per host (env JORA_NUM_PROCESSES)")
    process_id: int | None = Field(None, ge=0, description="this process, 0..N-1 (env JORA_PROCESS_ID)")
    heartbeat_timeout: int = Field(100, ge=1, description="seconds of silence before a process counts as dead")


class ExportSection(_Section):
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of the exported HF weights")
    verify: bool = Field(True, description="check exports against jora's model (needs the model in RAM)")
    max_shard_mb: int = Field(2048, ge=1, description="size of each model-*.safetensors file")
    peft_adapter: bool = Field(True, description="also export the adapter for peft")


class FinetuneSettings(_Section):
    workdir: str = Field(".", description="every stage writes its output under this directory")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()

    def resolved(self, base: Path) -> "FinetuneSettings":
        """Relative paths made absolute against `base` (the YAML file's directory, or the cwd)."""
        def fix(value: str | None) -> str | None:
            return str((base / value).resolve()) if value else value

        return self.model_copy(update={
            "workdir": fix(self.workdir),
            "model": self.model.model_copy(update={"checkpoint": fix(self.model.checkpoint),
                                                   "tokenizer": fix(self.model.tokenizer)}),
            "data": self.data.model_copy(update={"path": fix(self.data.path)}),
        })


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" + (f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else "")


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw["train"]["lr"] = value for dotted "train.lr", making the sections it lacks."""
    section = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        section = section.setdefault(part, {})
    section[leaf] = value


def load_settings(path: Path, overrides: dict | None = None) -> FinetuneSettings:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise JoraError("settings file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JoraError(f"not valid YAML{where}", path) from None
    if not isinstance(raw, dict):
        raise JoraError("expected a mapping of settings", path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        settings = FinetuneSettings.model_validate(raw)
    except ValidationError as exc:
        raise JoraError(_first_error(exc), path) from None
    return settings.resolved(path.parent.resolve())
