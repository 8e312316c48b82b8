"""vlm-fusion: LLaVA-, BLIP-2- and Flamingo-style vision-language models from any vision tower and any causal LM.

Importing the package registers every family with transformers' Auto* classes (this module is the only place
that registers anything).
"""

from typing import NamedTuple

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_base import FusionConfig
from .configuration_blip2 import FusionBlip2Config, FusionBlip2QFormerConfig
from .configuration_flamingo import FusionFlamingoConfig
from .configuration_llava import FusionLlavaConfig
from .modeling_base import (
    FusionCausalLMOutputWithPast,
    FusionForConditionalGeneration,
    FusionModel,
    FusionModelOutputWithPast,
    FusionPreTrainedModel,
)
from .modeling_blip2 import FusionBlip2ForConditionalGeneration, FusionBlip2Model
from .modeling_flamingo import (
    FusionFlamingoForConditionalGeneration,
    FusionFlamingoModel,
    GatedCrossAttentionBlock,
    PerceiverResampler,
)
from .modeling_qformer import FusionBlip2ForImageTextRetrieval, FusionQFormer
from .modeling_llava import FusionLlavaForConditionalGeneration, FusionLlavaModel, FusionLlavaProjector
from .processing_base import FusionProcessor
from .processing_blip2 import FusionBlip2Processor, FusionInstructBlipProcessor
from .processing_flamingo import FusionFlamingoProcessor
from .processing_idefics import FusionIdeficsProcessor
from .processing_llava import FusionLlavaProcessor
from .processing_qformer import FusionBlip2QFormerProcessor

__version__ = "0.2.0"


class Family(NamedTuple):
    config: type  # the family's config
    model: type  # with the LM head: what AutoModelForImageTextToText builds
    processor: type
    base_model: type  # headless: what AutoModel builds

    @property
    def name(self) -> str:
        """The family's short name ("llava", "blip2", "flamingo"): `--family`, the demo models' names."""
        return self.config.model_type.removeprefix("fusion_")


# model_type -> Family: every family, in one table, which everything else reads (the command line keeps a copy of the
# short names, checked against it by its tests, to answer --help without importing this package).
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


def family_named(name: str) -> Family:
    """The family whose short name (`Family.name`) is `name`."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; the families are {', '.join(f.name for f in FAMILIES.values())}")


for _model_type, _family in FAMILIES.items():
    AutoConfig.register(_model_type, _family.config, exist_ok=True)
    AutoModel.register(_family.config, _family.base_model, exist_ok=True)
    AutoModelForImageTextToText.register(_family.config, _family.model, exist_ok=True)
    AutoProcessor.register(_family.config, _family.processor, exist_ok=True)

# BLIP-2's stage 1: the Q-Former with its text side and heads, no LM (a retrieval / zero-shot classification model).
AutoConfig.register(FusionBlip2QFormerConfig.model_type, FusionBlip2QFormerConfig, exist_ok=True)
AutoModel.register(FusionBlip2QFormerConfig, FusionBlip2ForImageTextRetrieval, exist_ok=True)
AutoModelForZeroShotImageClassification.register(FusionBlip2QFormerConfig, FusionBlip2ForImageTextRetrieval,
                                                 exist_ok=True)
AutoProcessor.register(FusionBlip2QFormerConfig, FusionBlip2QFormerProcessor, exist_ok=True)

__all__ = [
    "FAMILIES",
    "Family",
    "family_named",
    "FusionBlip2Config",
    "FusionBlip2ForConditionalGeneration",
    "FusionBlip2ForImageTextRetrieval",
    "FusionBlip2Model",
    "FusionBlip2Processor",
    "FusionBlip2QFormerConfig",
    "FusionBlip2QFormerProcessor",
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
