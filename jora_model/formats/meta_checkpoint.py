"""Meta's original Llama checkpoint (params.json, tokenizer.model, consolidated.NN.pth), read tensor
by tensor and merged across model-parallel shards the way Meta's model.py split them.

Names, split dims (fairscale's layers in Meta's model.py) and which rows are rotary come from the
name table (names.py); rope.freqs is unused. Llama 2 and Llama 3 checkpoints differ in how the shards
split the embedding, which the shards' shapes tell apart (meta_family), so no flag has to say which.
Likewise a tied output head (Llama 3.2 1B/3B) is told by the shards themselves (_head_is_tied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from jora_model.errors import JoraError
from jora_model.formats.names import LLAMA2, LLAMA3, TABLE, TIED_TO, TensorKind
from jora_model.model.config import read_json_object, read_meta_params

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")

def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a Meta wq/wk ([heads * E, in]) from interleaved rotary pairs
    (2i, 2i+1) to rotate-half pairs (i, i + E/2): per head, rows [0, 2, 4, ..., 1, 3, 5, ...].
    For wk, `n_heads` is the number of KV heads."""
    rows, cols = w.shape
    e = rows // n_heads
    return w.reshape(n_heads, e // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def is_meta_checkpoint(src: Path) -> bool:
    return (src / "params.json").exists() or any(SHARD_PATTERN.match(p.name) for p in src.iterdir())


def shard_files(src: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be numbered 0..N-1 without gaps."""
    found = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := SHARD_PATTERN.match(p.name)))
    if not found:
        raise JoraError("no consolidated.NN.pth shards found", src)
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        detail = f"missing consolidated.{missing[0]:02d}.pth" if missing else "duplicate shard numbers"
        raise JoraError(f"shard files {', '.join(p.name for _, p in found)} are not numbered 00..{len(found) - 1:02d} "
                        f"({detail})", src)
    return [p for _, p in found]


def verify_zip_crcs(path: Path) -> None:
    """torch.save writes a zip whose members carry CRC32s, but torch.load never checks them: a flipped
    byte inside a tensor would load silently. Stream every member once and compare."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise JoraError(f"not a readable torch checkpoint ({exc})", path) from None
    if bad is not None:
        raise JoraError(f"corrupt checkpoint: {bad} fails its CRC check", path)


def _load_shard(path: Path) -> dict:
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise JoraError("not a readable torch checkpoint (truncated or corrupt, or saved in torch's legacy "
                        "non-zip format)", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or corrupt zips and pickles
        message = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise JoraError(f"cannot read checkpoint shard ({message})", path) from None
    if not isinstance(state, dict):
        raise JoraError("checkpoint shard does not hold a state dict", path)
    return state


def _same_tensor(a, b) -> bool:
    """Bitwise equal torch tensors; the first rows first, so an untied head costs one row to tell."""
    import torch

    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a[:1], b[:1]) and torch.equal(a, b))


def _to_numpy(tensor, path: Path, name: str) -> np.ndarray:
    import ml_dtypes
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise JoraError(f"{name} is not a tensor", path)
    try:
        if tensor.dtype == torch.bfloat16:
            return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        if tensor.dtype in (torch.float16, torch.float32, torch.float64):
            return tensor.contiguous().numpy()
    except RuntimeError as exc:  # mmap'd data past the end of a truncated file
        raise JoraError(f"cannot read {name} ({exc})", path) from None
    raise JoraError(f"{name} has unsupported dtype {tensor.dtype}", path)


def _params_dims(path: Path) -> tuple[object, object]:
    """params.json's dim and vocab_size as written (read_meta_params checks the whole file): the
    shards' layout has to be known before the vocabulary size, which Llama 2 leaves at -1."""
    params = read_json_object(path)
    return params.get("dim"), params.get("vocab_size", -1)


def meta_family(embed_shard: tuple[int, int], n_shards: int, dim: int, shard: Path | None) -> tuple[str, int]:
    """(LLAMA2 or LLAMA3, vocabulary size) from the shape of one shard's tok_embeddings.weight.

    With n shards Llama 2's ParallelEmbedding leaves [V, dim/n] in each and Llama 3's
    VocabParallelEmbedding [V/n, dim]; for n > 1 the widths differ, and with one shard both are [V, dim]."""
    rows, width = embed_shard
    if width == dim:
        return (LLAMA3 if n_shards > 1 else LLAMA2), rows * n_shards
    if n_shards > 1 and width * n_shards == dim:
        return LLAMA2, rows
    expected = f"[V, {dim}]" if n_shards == 1 else \
        f"Llama 2's [V, {dim}/{n_shards}] or Llama 3's [V/{n_shards}, {dim}]"
    raise JoraError(f"tok_embeddings.weight is [{rows}, {width}] in each of {n_shards} shard(s), not {expected} "
                    "for params.json's dim (a missing or extra consolidated.NN.pth?)", shard)


class MetaCheckpoint:
    def __init__(self, src: Path):
        self.src = Path(src)
        params_path = self.src / "params.json"
        if not params_path.is_file():
            raise JoraError("file not found (Meta's layout needs params.json)", params_path)
        self.shards = shard_files(self.src)
        for shard in self.shards:
            verify_zip_crcs(shard)
        tokenizer = self.src / "tokenizer.model"
        self.tokenizer = tokenizer if tokenizer.is_file() else None
        self.family, vocab_size = self._read_layout(params_path)
        self.config = read_meta_params(params_path, vocab_size=vocab_size).replace(
            tie_word_embeddings=self._head_is_tied())
        n = len(self.shards)
        for what, count in (("n_heads", self.config.n_heads), ("n_kv_heads", self.config.n_kv_heads)):
            if count % n:
                raise JoraError(f"{n} model-parallel shards cannot split {what}={count}", params_path)

    def _read_layout(self, params_path: Path) -> tuple[str, int]:
        """The checkpoint's family and vocabulary size, from shard 0's embedding and params.json."""
        dim, file_vocab = _params_dims(params_path)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            read_meta_params(params_path, vocab_size=1)  # its own message for a missing or mistyped dim
            raise JoraError(f"field 'dim' must be a positive integer ({dim!r})", params_path)
        rows, width = self._embedding_shape()
        family, vocab_size = meta_family((rows, width), len(self.shards), dim, self.shards[0])
        if isinstance(file_vocab, int) and file_vocab > 0 and file_vocab != vocab_size:
            raise JoraError(f"vocab_size {file_vocab} disagrees with the weights: {len(self.shards)} shard(s) "
                            f"of a [{rows}, {width}] tok_embeddings.weight hold {vocab_size} rows "
                            f"in {family}'s layout", params_path)
        return family, vocab_size

    def _embedding_shape(self) -> tuple[int, int]:
        """Shard 0's embedding: its shape tells the family and the vocabulary size (Llama 2's
        params.json says vocab_size -1)."""
        state = _load_shard(self.shards[0])
        embedding = state.get("tok_embeddings.weight")
        if embedding is None or embedding.ndim != 2:
            raise JoraError("tok_embeddings.weight not found or not a matrix", self.shards[0])
        return int(embedding.shape[0]), int(embedding.shape[1])

    def _head_is_tied(self) -> bool:
        """Llama 3.2 1B and 3B tie the output head to the embedding; params.json does not say so.
        Their shards hold no output.weight, or a copy of the embedding (llama-models' Transformer
        always has an output layer and loads its state strictly): either means tied. A head equal
        to the embedding computes the tied model's logits whatever the checkpoint meant, so storing
        it once loses nothing."""
        head, embed = (TABLE.by_store(name)[0].meta_name() for name in ("lm_head", TIED_TO))
        states = [_load_shard(path) for path in self.shards]
        holding = [head in state for state in states]
        if any(holding) and not all(holding):
            lacking = self.shards[holding.index(False)]
            raise JoraError(f"tensor {head} not found (other shards hold it)", lacking)
        # Llama 3 splits both on their vocabulary rows, so equal pieces mean equal tensors; Llama 2's
        # pieces differ in shape and compare unequal, as its heads are never tied.
        return all(_same_tensor(state[head], state.get(embed)) for state in states) if all(holding) else True

    def tensor_count(self) -> int:
        return len(TABLE.tensors(self.config))

    def tensors(self) -> Iterator[tuple[str, np.ndarray, Path]]:
        """(store name, [in, out] array in the checkpoint's dtype, file it came from), one at a time.

        The shards are reopened for each layer so the pages of tensors already converted are dropped
        with their mapping: resident memory stays near one layer, not the whole checkpoint."""
        for group in TABLE.of(self.config).groups(self.config.n_layers):
            states = [_load_shard(path) for path in self.shards]
            for kind, layer in group:
                meta_name = kind.meta_name(layer)
                merged = self._merge(states, meta_name, kind)
                # Meta's linear weights are [out, in]; the store keeps [in, out]. The embedding stays [V, D].
                yield kind.store_name(layer), (merged.T if merged.ndim == 2 and kind.transposed else merged), \
                    self._source(meta_name)
            del states

    def _source(self, meta_name: str) -> str:
        where = self.shards[0] if len(self.shards) == 1 else self.src / "consolidated.*.pth"
        return f"{where} ({meta_name})"

    def _merge(self, states: list[dict], name: str, kind: TensorKind) -> np.ndarray:
        pieces = []
        for path, state in zip(self.shards, states):
            if name not in state:
                raise JoraError(f"tensor {name} not found", path)
            pieces.append(_to_numpy(state[name], path, name))
        for path, piece in zip(self.shards, pieces):
            if piece.shape != pieces[0].shape:
                raise JoraError(f"{name} has shape {piece.shape} here but {pieces[0].shape} in "
                                f"{self.shards[0].name}", path)
        split = kind.meta_split_of(self.family)
        if split is None or len(pieces) == 1:
            merged = pieces[0]
        else:
            merged = np.concatenate(pieces, axis=split)
        if kind.rotary_heads is not None:
            heads = getattr(self.config, kind.rotary_heads)
            if merged.ndim != 2 or merged.shape[0] % (heads * 2):
                raise JoraError(f"{name} has shape {merged.shape}, not {heads} heads of even width",
                                self._source(name))
            merged = interleaved_to_rotate_half(merged, heads)
        return merged
