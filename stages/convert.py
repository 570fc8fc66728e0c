"""Stage 1, convert: Meta's original checkpoint or an HF Llama directory -> our parameter store.

Inputs: the checkpoint's files (which ones depends on the detected layout) and an optional tokenizer,
with a tokenizer.json's tokenizer_config.json. Output: a parameter store (jora_model.formats.store), the
tokenizer and its tokenizer_config.json copied beside it, plus the stage manifest.
Cache key: content of those files, the store dtype and shard size, and CODE_VERSION.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from jora_model.errors import JoraError
from jora_model.schema import check_settings, setting

from .base import StageResult, run_stage
from .options import settings_options

CODE_VERSION = "convert-1"
log = logging.getLogger("jora")


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
    dtype: str = setting("bf16", "dtype of the stored weights: bf16 (training) or fp32 (exact checks)",
                         choices=("bf16", "fp32"))
    max_shard_bytes: int = setting(2 * 1024 ** 3, "split the safetensors files at about this many MiB", ge=1,
                                   option="--max-shard-size", unit=1024 ** 2)
    tokenizer: str | None = setting(None, "a tokenizer.model to store when the checkpoint has none (or to use "
                                    "instead of its own)", path=True)

    def __post_init__(self) -> None:
        check_settings(self)


def detect_layout(src: Path) -> str:
    """'meta' or 'hf'; a clear error for anything else."""
    from jora_model.formats.hf_checkpoint import is_hf_directory
    from jora_model.formats.meta_checkpoint import is_meta_checkpoint

    if not src.exists():
        raise JoraError("source checkpoint not found", src)
    if not src.is_dir():
        raise JoraError("source checkpoint must be a directory", src)
    if is_meta_checkpoint(src):
        return "meta"
    if is_hf_directory(src):
        return "hf"
    raise JoraError("neither Meta's layout (params.json, consolidated.NN.pth) nor a Hugging Face "
                    "directory (config.json)", src)


def input_files(src: Path, layout: str, tokenizer: Path | None) -> dict[str, Path]:
    if layout == "meta":
        names = ["params.json", "tokenizer.model"] + sorted(p.name for p in src.glob("consolidated.*.pth"))
    else:
        names = ["config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"]
        names += sorted(p.name for p in src.glob("*.safetensors"))
    files = {name: src / name for name in names if (src / name).is_file()}
    if tokenizer is not None:
        from jora_model.data.tokenizer_files import tokenizer_companions

        files["--tokenizer"] = tokenizer
        files.update({f"--tokenizer:{name}": path for name, path in tokenizer_companions(tokenizer).items()})
    return files


def _open_checkpoint(src: Path, layout: str):
    if layout == "meta":
        from jora_model.formats.meta_checkpoint import MetaCheckpoint

        return MetaCheckpoint(src)
    from jora_model.formats.hf_checkpoint import HFCheckpoint

    return HFCheckpoint(src)


def _check_tokenizer(tokenizer: Path, vocab_size: int, exact: bool) -> None:
    from jora_model.data.tokenizer_files import HF_JSON, tokenizer_kind, tokenizer_vocab_size

    n = tokenizer_vocab_size(tokenizer)
    if n > vocab_size or (exact and n != vocab_size):
        raise JoraError(f"tokenizer has {n} ids but the model's embedding has {vocab_size} rows: "
                        "this tokenizer does not belong to this model", tokenizer)
    if tokenizer_kind(tokenizer) == HF_JSON:  # its tokenizer_config.json must name tokens it has
        from jora_model.data.tokenizer import load_tokenizer

        load_tokenizer(tokenizer)


def convert(src: str | Path, out: str | Path, settings: ConvertSettings = ConvertSettings(),
            force: bool = False, progress: bool | None = None) -> StageResult:
    """Convert the checkpoint in `src` into a parameter store in `out` (skipped when up to date)."""
    from jora_model.formats.store import store_dtype

    src, out = Path(src), Path(out)
    store_dtype(settings.dtype)  # reject a bad dtype before any work
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise JoraError("output directory must not be inside the source checkpoint", out)
    layout = detect_layout(src)
    tokenizer_override = Path(settings.tokenizer) if settings.tokenizer else None
    if tokenizer_override is not None and not tokenizer_override.is_file():
        raise JoraError("tokenizer file not found", tokenizer_override)
    files = input_files(src, layout, tokenizer_override)

    def build(tmp: Path) -> dict:
        from tqdm import tqdm

        from jora_model.formats.store import StoreWriter

        checkpoint = _open_checkpoint(src, layout)
        tokenizer = tokenizer_override or checkpoint.tokenizer
        if tokenizer is None:
            log.warning("convert: %s has no tokenizer; the store will have none (give --tokenizer)", src)
        else:
            _check_tokenizer(tokenizer, checkpoint.config.vocab_size, exact=layout == "meta")
        writer = StoreWriter(tmp, checkpoint.config, settings.dtype, tokenizer, settings.max_shard_bytes,
                             extra={"source": {"layout": layout, "path": str(src.resolve())}})
        bar = tqdm(total=checkpoint.tensor_count(), unit="tensor", desc="convert", disable=progress is False
                   if progress is not None else None)
        with bar:
            for name, array, source in checkpoint.tensors():
                writer.write(name, array, source)
                bar.update()
        writer.finish()  # copies the tokenizer and its companions (tokenizer_companions) into the store
        return {"layout": layout, "params": checkpoint.config.param_count(),
                "config": checkpoint.config.to_dict()}

    return run_stage("convert", CODE_VERSION, out, files, dataclasses.asdict(settings), build, force=force)


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@settings_options(ConvertSettings, "settings")
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
def convert_command(src: Path, out: Path, settings: ConvertSettings, force: bool) -> None:
    """Convert a Llama checkpoint (Meta's original layout or an HF directory) in SRC into a jora
    parameter store in OUT."""
    result = convert(src, out, settings, force=force)
    facts = result.manifest.get("facts", {})
    verb = "skipped (up to date)" if result.skipped else "converted"
    click.echo(f"{verb}: {result.out_dir} ({facts.get('layout', '?')} checkpoint, "
               f"{facts.get('params', 0) / 1e6:.1f}M parameters)")
