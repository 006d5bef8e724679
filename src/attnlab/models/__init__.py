"""Small models with a swappable mixer: a decoder LM, an encoder classifier and a ViT."""

from attnlab.models.blocks import (
    Block,
    BlockStack,
    MechanismMismatch,
    build_mixer,
    check_mixer,
    count_parameters,
    mixer_refusal,
)
from attnlab.models.classifier import SequenceClassifier
from attnlab.models.language_model import LanguageModel
from attnlab.models.vision import VisionTransformer

__all__ = ["Block", "BlockStack", "LanguageModel", "MechanismMismatch", "SequenceClassifier", "VisionTransformer",
           "build_mixer", "check_mixer", "count_parameters", "mixer_refusal"]
