"""vLLM's Transformers backend class for vlm-fusion models (imported by vLLM only, through `vllm.register`)."""

import dataclasses

import torch

from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY


INSTRUCTION_ONE_KIND = (
    "Instruction-aware BLIP-2-style models (qformer_text_input) take an image or a clip per prompt on vLLM 0.32, not "
    "both: its Transformers backend gives the instruction (qformer_input_ids) to neither modality when a prompt has "
    "both (MultiModalProcessor._partition_keys_by_modality), so the Q-Former would read no text; generate with "
    "transformers for both."
)


class FusionMultiModalProcessor(MultiModalProcessor):
    """
    The backend's processor, for what BLIP-2-style prompts need:

    - a prompt that does not place its image (or its clip) gets its `<image>` (or `<video>`) in front of it, BOS
      included: the layout `FusionBlip2Processor` (and transformers' `Blip2Processor` and
      `InstructBlipVideoProcessor`) gives such a prompt;
    - an instruction-aware Q-Former (InstructBLIP) reads the prompt's text, which vLLM does not show the processor (it
      processes each image or clip alone, to cache it): it is passed as `instruction`, and so enters the items' cache
      keys.
    """

    def apply(self, inputs, timing_ctx):
        config = self.info.get_hf_config()
        items = inputs.mm_data_items
        counts = {modality: len(items[modality]) if modality in items else 0 for modality in ("image", "video")}
        markers = {"image": config.image_token_id, "video": config.video_token_id}
        if config.model_type == "fusion_blip2" and any(counts.values()):
            if config.qformer_text_input:
                if all(counts.values()):
                    raise ValueError(INSTRUCTION_ONE_KIND)
                tokenizer = self.info.get_tokenizer()
                text = [t for t in inputs.prompt if t not in markers.values()]
                if text and text[0] == tokenizer.bos_token_id:  # the BOS the tokenizer added, not the prompt's text
                    text = text[1:]
                kwargs = {**inputs.hf_processor_mm_kwargs, "instruction": tokenizer.decode(text)}
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
            missing = [modality for modality, count in counts.items()
                       if count and markers[modality] not in inputs.prompt]
            if len(missing) == 2:
                raise ValueError("A BLIP-2-style prompt without <image> and <video> takes one image or one clip, not "
                                 "both: write the markers in the prompt.")
            for modality in missing:
                inputs = dataclasses.replace(
                    inputs, prompt=[markers[modality]] * counts[modality] + list(inputs.prompt))
        return super().apply(inputs, timing_ctx)


@MULTIMODAL_REGISTRY.register_processor(FusionMultiModalProcessor, info=MultiModalProcessingInfo,
                                        dummy_inputs=MultiModalDummyInputsBuilder)
class FusionForVLLM(TransformersMultiModalForCausalLM):
    """vLLM's Transformers multimodal backend; the placeholder ids may lie outside the LM's embedding table."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        placeholders = [i for i in (config.image_token_id, config.video_token_id) if i is not None]
        self.configure_mm_token_handling(config.get_text_config().vocab_size, placeholders)

    def _get_features(self, modality, pixel_values, **kwargs):
        """Items whose own inputs differ in length (InstructBLIP's instructions) arrive as lists beside stacked pixels,
        which `get_image_features` / `get_video_features` cannot take: each item is then encoded alone."""
        if not any(isinstance(value, list) for value in kwargs.values()):
            return super()._get_features(modality, pixel_values, **kwargs)
        n = len(pixel_values)
        features = []
        for i in range(n):
            item = {key: torch.stack(value) if isinstance(value, list) else value
                    for key, value in self._select_item_kwargs(kwargs, i, n).items()}
            features.append(super()._get_features(modality, pixel_values[i:i + 1], **item))
        return torch.cat(features)
