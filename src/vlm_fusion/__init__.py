"""vlm-fusion: LLaVA-, BLIP-2- and Flamingo-style vision-language models from any vision tower and any causal LM.

Importing the package registers every family with transformers' Auto* classes (this module is the only place
that registers anything).
"""

from typing import NamedTuple

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_base import FusionConfig
from .configuration_blip2 import FusionBlip2Config
from .configuration_flamingo import FusionFlamingoConfig
from .configuration_llava import FusionLlavaConfig
from .modeling_base import (
    FusionCausalLMOutputWithPast,
    FusionForConditionalGeneration,
    FusionModel,
    FusionModelOutputWithPast,
    FusionPreTrainedModel,
)
from .modeling_blip2 import FusionBlip2ForConditionalGeneration, FusionBlip2Model, FusionQFormer
from .modeling_flamingo import (
    FusionFlamingoForConditionalGeneration,
    FusionFlamingoModel,
    GatedCrossAttentionBlock,
    PerceiverResampler,
)
from .modeling_llava import FusionLlavaForConditionalGeneration, FusionLlavaModel, FusionLlavaProjector
from .processing_fusion import (
    FusionBlip2Processor,
    FusionFlamingoProcessor,
    FusionIdeficsProcessor,
    FusionInstructBlipProcessor,
    FusionLlavaProcessor,
    FusionProcessor,
)

__version__ = "0.2.0"


class Family(NamedTuple):
    config: type  # the family's config
    model: type  # with the LM head: what AutoModelForImageTextToText builds
    processor: type
    base_model: type  # headless: what AutoModel builds


# model_type -> Family: every family, in one table.
FAMILIES = {
    FusionLlavaConfig.model_type: Family(
        FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaProcessor, FusionLlavaModel
    ),
    FusionBlip2Config.model_type: Family(
        FusionBlip2Config, FusionBlip2ForConditionalGeneration, FusionBlip2Processor, FusionBlip2Model
    ),
    FusionFlamingoConfig.model_type: Family(
        FusionFlamingoConfig, FusionFlamingoForConditionalGeneration, FusionFlamingoProcessor, FusionFlamingoModel
    ),
}

for _model_type, _family in FAMILIES.items():
    AutoConfig.register(_model_type, _family.config, exist_ok=True)
    AutoModel.register(_family.config, _family.base_model, exist_ok=True)
    AutoModelForImageTextToText.register(_family.config, _family.model, exist_ok=True)
    AutoProcessor.register(_family.config, _family.processor, exist_ok=True)

__all__ = [
    "FAMILIES",
    "FusionBlip2Config",
    "FusionBlip2ForConditionalGeneration",
    "FusionBlip2Model",
    "FusionBlip2Processor",
    "FusionCausalLMOutputWithPast",
    "FusionConfig",
    "FusionForConditionalGeneration",
    "FusionIdeficsProcessor",
    "FusionInstructBlipProcessor",
    "FusionModel",
    "FusionModelOutputWithPast",
    "FusionFlamingoConfig",
    "FusionFlamingoForConditionalGeneration",
    "FusionFlamingoModel",
    "FusionFlamingoProcessor",
    "GatedCrossAttentionBlock",
    "PerceiverResampler",
    "FusionLlavaConfig",
    "FusionLlavaForConditionalGeneration",
    "FusionLlavaModel",
    "FusionLlavaProcessor",
    "FusionLlavaProjector",
    "FusionPreTrainedModel",
    "FusionProcessor",
    "FusionQFormer",
]
