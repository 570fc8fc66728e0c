"""jora's library: the Llama model, LoRA, sharding, training, data formats and checkpoint IO.

Importing this package does no work: no device queries, no JAX initialisation.
"""

from jora_model.data.alpaca import AlpacaConfig, generate_alpaca_dataset
from jora_model.api import LoadedModel, load_model
from jora_model.model.config import PRESETS, LlamaConfig, preset
from jora_model.errors import JoraError
from jora_model.seed_api import ParallamaConfig, train_lora

__all__ = ["AlpacaConfig", "JoraError", "LlamaConfig", "LoadedModel", "PRESETS", "ParallamaConfig",
           "generate_alpaca_dataset", "load_model", "preset", "train_lora"]
