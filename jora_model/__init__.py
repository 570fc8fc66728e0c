"""jora's library: the Llama model, LoRA, sharding, training, data formats and checkpoint IO.

Importing this package does no work: no device queries, no JAX initialisation.
"""

from .api import LoadedModel, load_model
from .config import PRESETS, LlamaConfig, preset
from .errors import JoraError

__all__ = ["JoraError", "LlamaConfig", "LoadedModel", "PRESETS", "load_model", "preset"]
