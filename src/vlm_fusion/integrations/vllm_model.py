"""vLLM's Transformers backend class for vlm-fusion models (imported by vLLM only, through `vllm.register`)."""

import dataclasses

from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY


class FusionMultiModalProcessor(MultiModalProcessor):
    """
    The backend's processor, for what BLIP-2-style prompts need:

    - a prompt that does not place its images gets their `<image>` in front of it, BOS included: the layout
      `FusionBlip2Processor` (and transformers' `Blip2Processor`) gives such a prompt;
    - an instruction-aware Q-Former (InstructBLIP) reads the prompt's text, which vLLM does not show the processor (it
      processes each image alone, to cache it): it is passed as `instruction`, and so enters the images' cache keys.
    """

    def apply(self, inputs, timing_ctx):
        config = self.info.get_hf_config()
        images = len(inputs.mm_data_items.get("image", [])) if "image" in inputs.mm_data_items else 0
        if config.model_type == "fusion_blip2" and images:
            image_token_id = config.image_token_id
            if config.qformer_text_input:
                tokenizer = self.info.get_tokenizer()
                text = [t for t in inputs.prompt if t != image_token_id]
                if text and text[0] == tokenizer.bos_token_id:  # the BOS the tokenizer added, not the prompt's text
                    text = text[1:]
                kwargs = {**inputs.hf_processor_mm_kwargs, "instruction": tokenizer.decode(text)}
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
            if image_token_id not in inputs.prompt:
                inputs = dataclasses.replace(inputs, prompt=[image_token_id] * images + list(inputs.prompt))
        return super().apply(inputs, timing_ctx)


@MULTIMODAL_REGISTRY.register_processor(FusionMultiModalProcessor, info=MultiModalProcessingInfo,
                                        dummy_inputs=MultiModalDummyInputsBuilder)
class FusionForVLLM(TransformersMultiModalForCausalLM):
    """vLLM's Transformers multimodal backend; the placeholder id may lie outside the LM's embedding table."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.configure_mm_token_handling(config.get_text_config().vocab_size, [config.image_token_id])
