"""jora's library: the Llama model, LoRA, sharding, training, data formats and checkpoint IO.

Importing this package does no work: no device queries, no JAX initialisation.
"""

from .alpaca import AlpacaConfig, generate_alpaca_dataset
from .api import LoadedModel, load_model
from .config import PRESETS, LlamaConfig, preset
from .errors import JoraError
from .seed_api import ParallamaConfig, train_lora

__all__ = ["AlpacaConfig", "JoraError", "LlamaConfig", "LoadedModel", "PRESETS", "ParallamaConfig",
           "generate_alpaca_dataset", "load_model", "preset", "train_lora"]
