"""The vLLM plugin: `vllm serve DIR` and `LLM(model=DIR)` for vlm-fusion checkpoints.

vLLM loads `register` in each of its processes (the `vllm.general_plugins` entry point). It maps the families'
architectures onto `FusionForVLLM`, vLLM's Transformers modeling backend (which builds our headless model with
`AutoModel.from_config`, runs its LM with vLLM's paged attention, and takes the images' visual tokens from
`get_image_features` and the clips' from `get_video_features`, sized by the processor's `_get_num_multimodal_tokens`)
with what our models need on top:

- a placeholder id (`<image>`, `<video>`) outside the LM's embedding table (allowed in vlm-fusion) is masked before the
  lookup, as the model itself does, since the visual tokens take those positions anyway;
- a BLIP-2-style prompt without `<image>` (or `<video>`) gets its images' (or clip's) placeholders in front, where the
  processor puts them.

Flamingo-style models are served natively instead (`vllm_flamingo.FusionFlamingoForVLLM`, on vLLM's encoder-decoder
path): the Transformers backend hands a model its text embeddings only, so gated cross-attention would never see the
images (`FusionFlamingoModel` refuses it). There an engine serves images or clips (vLLM 0.32 takes one modality for an
encoder-decoder model). vLLM reads their config as `FusionFlamingoServingConfig`, the same config
marked encoder-decoder.
"""

from ..configuration_flamingo import FusionFlamingoConfig

ARCHITECTURES = ("FusionLlavaForConditionalGeneration", "FusionBlip2ForConditionalGeneration")
FLAMINGO = "FusionFlamingoForConditionalGeneration"


class FusionFlamingoServingConfig(FusionFlamingoConfig):
    """What vLLM reads a `fusion_flamingo` checkpoint as: the same config, marked encoder-decoder, so vLLM gives the
    model its cross-attention cache (and turns chunked prefill and prefix caching off). Registered in vLLM's config
    registry by the plugin, so in vLLM's processes only (where `AutoConfig` then gives it too); a transformers model
    built from it would generate as an encoder-decoder model, so build those from `FusionFlamingoConfig`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.is_encoder_decoder = True


def register() -> None:
    """The entry point: the families with transformers' Auto classes and their architectures with vLLM (idempotent)."""
    import vlm_fusion  # noqa: F401  (vLLM builds the config, processor and model through the Auto classes)
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, "vlm_fusion.integrations.vllm_model:FusionForVLLM")
    ModelRegistry.register_model(FLAMINGO, "vlm_fusion.integrations.vllm_flamingo:FusionFlamingoForVLLM")
    _CONFIG_REGISTRY[FusionFlamingoServingConfig.model_type] = FusionFlamingoServingConfig
