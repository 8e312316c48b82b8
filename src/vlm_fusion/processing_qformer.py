"""BLIP-2's stage 1: the processor of the Q-Former model without an LM (`FusionBlip2ForImageTextRetrieval`)."""

from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images

from .special_tokens import add_special_token

DEC_TOKEN = "[DEC]"  # BLIP-2's first token of the ITG pass, added to the Q-Former's BERT tokenizer


class FusionBlip2QFormerProcessor(ProcessorMixin):
    r"""
    Processor of BLIP-2's stage-1 model ([`FusionBlip2ForImageTextRetrieval`]): images through the tower's image
    processor, captions through the Q-Former's tokenizer (BERT's: `[CLS]` first), cut at `max_text_length` tokens as
    LAVIS cuts them, padded to the longest.

    Args:
        image_processor: the vision tower's image processor.
        tokenizer: the Q-Former's tokenizer; `[DEC]`, the first token of the ITG pass, is added if missing.
        max_text_length (`int`, *optional*, defaults to 32): LAVIS's `max_txt_len`.
    """

    def __init__(self, image_processor=None, tokenizer=None, max_text_length: int = 32):
        if not isinstance(max_text_length, int) or max_text_length < 2:
            raise ValueError(f"`max_text_length` must be an integer of at least 2, got {max_text_length!r}.")
        self.max_text_length = max_text_length
        self.bos_token_id = add_special_token(tokenizer, DEC_TOKEN)
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, return_tensors=None, padding="longest", truncation=True,
                 max_length=None, **kwargs) -> BatchFeature:
        """`pixel_values` for `images`; `input_ids` / `attention_mask` for `text` (a string or a list of them)."""
        if images is None and text is None:
            raise ValueError("Give images, text, or both.")
        encoded = {}
        if text is not None:
            encoded.update(self.tokenizer(text, padding=padding, truncation=truncation,
                                          max_length=max_length or self.max_text_length, **kwargs))
        if images is not None:
            encoded.update(self.image_processor(make_flat_list_of_images(images)))
        return BatchFeature(encoded, tensor_type=return_tensors)

    def truncated(self, texts: list[str]) -> int:
        """How many of `texts` are longer than `max_text_length` tokens (and would be cut)."""
        lengths = self.tokenizer(texts, truncation=False)["input_ids"]
        return sum(len(ids) > self.max_text_length for ids in lengths)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask"]
