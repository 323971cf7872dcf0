"""Deep recurrent language models (d2l section 9.3): from scratch and on torch.nn, proven equal."""

from deeprnn.models.base import LanguageModel, State, detach_state
from deeprnn.models.concise import ConciseModel
from deeprnn.choices import CELLS, GRU_VARIANTS, IMPLS, INITS, INPUTS
from deeprnn.models.config import ModelConfig
from deeprnn.models.convert import (
    concise_to_scratch,
    scratch_to_concise,
    state_dict_to_concise,
    state_dict_to_scratch,
)
from deeprnn.models.scratch import ScratchModel


def build_model(config: ModelConfig) -> LanguageModel:
    """The model ``config`` describes (validated first; raises ``ConfigError``), on the CPU in float32."""
    config.validate()
    return ScratchModel(config) if config.impl == "scratch" else ConciseModel(config)


__all__ = [
    "CELLS",
    "GRU_VARIANTS",
    "IMPLS",
    "INITS",
    "INPUTS",
    "ConciseModel",
    "LanguageModel",
    "ModelConfig",
    "ScratchModel",
    "State",
    "build_model",
    "concise_to_scratch",
    "detach_state",
    "scratch_to_concise",
    "state_dict_to_concise",
    "state_dict_to_scratch",
]
