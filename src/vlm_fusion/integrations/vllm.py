"""The vLLM plugin: `vllm serve DIR` and `LLM(model=DIR)` for vlm-fusion checkpoints.

vLLM loads `register` in each of its processes (the `vllm.general_plugins` entry point). It maps the families'
architectures onto `FusionForVLLM`, vLLM's Transformers modeling backend (which builds our headless model with
`AutoModel.from_config`, runs its LM with vLLM's paged attention, and takes the images' visual tokens from
`get_image_features`) with what our models need on top:

- a placeholder id outside the LM's embedding table (allowed in vlm-fusion) is masked before the lookup, as the
  model itself does, since the visual tokens take those positions anyway;
- a BLIP-2-style prompt without `<image>` gets its images' placeholders in front, where the processor puts them.

Flamingo-style models are refused (by the model itself: see `FusionFlamingoModel`): the backend hands a model its
text embeddings only, so gated cross-attention would never see the images.
"""

ARCHITECTURES = ("FusionLlavaForConditionalGeneration", "FusionBlip2ForConditionalGeneration",
                 "FusionFlamingoForConditionalGeneration")


def register() -> None:
    """The entry point: the families with transformers' Auto classes and their architectures with vLLM (idempotent)."""
    import vlm_fusion  # noqa: F401  (vLLM builds the config, processor and model through the Auto classes)
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, "vlm_fusion.integrations.vllm_model:FusionForVLLM")
