"""The model: imports kernels and torch only (no Composer, no data code)."""

from mamba.model.config import MambaConfig
from mamba.model.generation import generate, sample_next
from mamba.model.lm import InferenceCache, MambaLMHeadModel, no_weight_decay_names

__all__ = ["InferenceCache", "MambaConfig", "MambaLMHeadModel", "generate", "no_weight_decay_names",
           "sample_next"]
