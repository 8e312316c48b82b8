"""vlm-fusion: LLaVA-, BLIP-2- and Flamingo-style vision-language models from any vision tower and any causal LM.

Importing the package registers every family with transformers' Auto* classes (this module is the only place
that registers anything).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_base import FusionConfig
from .configuration_blip2 import FusionBlip2Config
from .configuration_flamingo import FusionFlamingoConfig
from .configuration_llava import FusionLlavaConfig
from .modeling_base import FusionCausalLMOutputWithPast, FusionPreTrainedModel
from .modeling_blip2 import FusionBlip2ForConditionalGeneration, FusionQFormer
from .modeling_flamingo import FusionFlamingoForConditionalGeneration, GatedCrossAttentionBlock, PerceiverResampler
from .modeling_llava import FusionLlavaForConditionalGeneration, FusionLlavaProjector
from .processing_fusion import FusionBlip2Processor, FusionFlamingoProcessor, FusionLlavaProcessor, FusionProcessor

__version__ = "0.1.0"

# model_type -> (config, model, processor): every family, in one table.
FAMILIES = {
    FusionLlavaConfig.model_type: (FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaProcessor),
    FusionBlip2Config.model_type: (FusionBlip2Config, FusionBlip2ForConditionalGeneration, FusionBlip2Processor),
    FusionFlamingoConfig.model_type: (
        FusionFlamingoConfig, FusionFlamingoForConditionalGeneration, FusionFlamingoProcessor
    ),
}

for _model_type, (_config, _model, _processor) in FAMILIES.items():
    AutoConfig.register(_model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)

__all__ = [
    "FAMILIES",
    "FusionBlip2Config",
    "FusionBlip2ForConditionalGeneration",
    "FusionBlip2Processor",
    "FusionCausalLMOutputWithPast",
    "FusionConfig",
    "FusionFlamingoConfig",
    "FusionFlamingoForConditionalGeneration",
    "FusionFlamingoProcessor",
    "GatedCrossAttentionBlock",
    "PerceiverResampler",
    "FusionLlavaConfig",
    "FusionLlavaForConditionalGeneration",
    "FusionLlavaProcessor",
    "FusionLlavaProjector",
    "FusionPreTrainedModel",
    "FusionProcessor",
    "FusionQFormer",
]
