"""A Hugging Face Llama directory (config.json + safetensors, sharded or not), read tensor by tensor.

transformers already keeps q/k in the rotate-half convention we store, so nothing is permuted; its
linear weights are [out, in] and are transposed to our [in, out]. With `tie_word_embeddings` the
store gets no head tensor (the model reads the embedding as its head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from jora_model.errors import JoraError
from jora_model.formats.names import TABLE
from jora_model.formats.safetensors_io import SafetensorsFile
from jora_model.model.config import read_hf_config


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def is_hf_directory(src: Path) -> bool:
    return (src / "config.json").is_file()


class HFCheckpoint:
    def __init__(self, src: Path):
        self.src = Path(src)
        self.config, _ = read_hf_config(self.src / "config.json")
        self.weight_map = self._weight_map()
        self.tokenizer = next((p for p in (self.src / "tokenizer.model", self.src / "tokenizer.json")
                               if p.is_file()), None)
        self._names = self._expected_names()
        for hf_name, _, _ in self._names:
            if hf_name not in self.weight_map:
                raise JoraError(f"tensor {hf_name} not found in the checkpoint", self.src)

    def _weight_map(self) -> dict[str, str]:
        index = self.src / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise JoraError("corrupt safetensors index (no weight_map)", index) from None
            for file_name in set(weight_map.values()):
                if not (self.src / file_name).is_file():
                    raise JoraError(f"{file_name} is listed in the index but missing", index)
            return weight_map
        single = self.src / SINGLE_NAME
        if single.is_file():
            with SafetensorsFile(single) as f:
                return {name: SINGLE_NAME for name in f.keys()}
        if any(self.src.glob("*.bin")):
            raise JoraError("only pickled pytorch_model*.bin weights found; jora reads safetensors only "
                            "(re-save with save_pretrained(safe_serialization=True))", self.src)
        raise JoraError(f"no {SINGLE_NAME} or {INDEX_NAME} found", self.src)

    def _expected_names(self) -> list[tuple[str, str, bool]]:
        """(HF name, store name, whether HF holds it transposed) of every tensor, in checkpoint order."""
        # A tied head has no row here: the model reads the embedding (an lm_head.weight that a tied
        # checkpoint also carries is ignored, as transformers ignores it when it ties the two).
        return [(kind.hf_name(layer), kind.store_name(layer), kind.transposed)
                for kind, layer in TABLE.tensors(self.config)]

    def tensor_count(self) -> int:
        return len(self._names)

    def tensors(self) -> Iterator[tuple[str, np.ndarray, Path]]:
        for hf_name, store_name, transposed in self._names:
            path = self.src / self.weight_map[hf_name]
            # Open per tensor and hand out a view of the mapping: the writer copies it block by block
            # straight to the store, and the mapping (with its resident pages) goes with the file.
            with SafetensorsFile(path) as f:
                if hf_name not in f:
                    raise JoraError(f"tensor {hf_name} not found", path)
                array = f.view(hf_name)
                if array.ndim == 2 and transposed:
                    array = array.T  # [out, in] -> [in, out]
                yield store_name, array, path
                del array
