"""The BLIP-2-style family's processors: `num_query_tokens` placeholders per image, and InstructBLIP's, whose Q-Former
also reads the instruction."""

from transformers import BatchFeature
from transformers.image_utils import make_flat_list_of_images

from .processing_base import FusionProcessor
from .processing_video import FusionVideoProcessor, num_frames_of


class FusionBlip2Processor(FusionProcessor):
    """
    Processor of the BLIP-2-style family: `num_query_tokens` placeholders per image.

    A prompt without `<image>` gets its image's placeholders in front of the whole tokenized prompt, BOS included —
    the layout BLIP-2 was trained with and that transformers' `Blip2Processor` produces; so does a prompt without
    `<video>` its clip's (transformers' `InstructBlipVideoProcessor`). Left padding goes in front of the placeholders
    (`Blip2Processor` pads between them and the text).
    """

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        texts = [text] if isinstance(text, str) else text
        markers = [marker for marker in (self.image_token, self.video_token) if marker]
        if (images is None and videos is None) or texts is None or any(m in t for t in texts for m in markers) \
                or (videos is not None and getattr(self, "video_processor", None) is None):
            return super().__call__(images=images, text=text, videos=videos, **kwargs)
        if images is not None and videos is not None:
            raise ValueError(f"Prompts without {self.image_token} and {self.video_token} take one image or one clip "
                             "each, not both: write the markers in the text.")
        kind, marker = ("image", self.image_token) if images is not None else ("clip", self.video_token)
        items = make_flat_list_of_images(images) if images is not None else FusionVideoProcessor.batched(videos)
        if len(items) != len(texts):
            raise ValueError(f"Prompts without {marker} take one {kind} each: got {len(texts)} prompts and "
                             f"{len(items)} {kind}s.")
        return_tensors = kwargs.pop("return_tensors", None)
        padding = kwargs.pop("padding", False)
        max_length = kwargs.pop("max_length", None)
        if images is not None:
            visual = {"pixel_values": self.image_processor(items)["pixel_values"]}
            token_id, count = self.image_token_id, self.image_seq_length
        else:
            sampling = {key: kwargs.pop(key) for key in ("num_frames", "fps", "do_sample_frames", "video_metadata")
                        if key in kwargs}
            visual = dict(self.video_processor(items, **sampling))
            token_id, count = self.video_token_id, self.num_video_tokens(num_frames_of(visual, 0))
        if max_length is not None:
            max_length -= count
        encoded = self.tokenizer(list(texts), max_length=max_length, **kwargs)
        prefix = [token_id] * count
        features = {
            "input_ids": [prefix + ids for ids in encoded["input_ids"]],
            "attention_mask": [[1] * len(prefix) + mask for mask in encoded["attention_mask"]],
        }
        features = self.tokenizer.pad(features, padding=padding)
        return BatchFeature({**features, **visual}, tensor_type=return_tensors)


class FusionInstructBlipProcessor(FusionBlip2Processor):
    """
    Processor of instruction-aware BLIP-2-style models (InstructBLIP, `qformer_text_input=True`): as
    [`FusionBlip2Processor`], plus the instruction in the Q-Former's own vocabulary, `qformer_input_ids` and
    `qformer_attention_mask` `(batch_size, instruction_length)`, one row per prompt.

    Args:
        qformer_tokenizer: the Q-Former's tokenizer (BERT's, for InstructBLIP); saved in a `qformer_tokenizer` folder.
    """

    variant_of = FusionBlip2Processor

    def __init__(self, image_processor=None, tokenizer=None, qformer_tokenizer=None, chat_template=None,
                 image_token="<image>", image_seq_length=1, qformer_text_input=True, video_processor=None, video_token="<video>",
                 video_tokens_per_frame=0, video_tokens_per_clip=0):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_token=image_token,
                         image_seq_length=image_seq_length, qformer_tokenizer=qformer_tokenizer,
                         video_processor=video_processor, video_token=video_token,
                         video_tokens_per_frame=video_tokens_per_frame, video_tokens_per_clip=video_tokens_per_clip)
        self.qformer_text_input = True

    def __call__(self, images=None, text=None, instruction: str | None = None, **kwargs):
        """As [`FusionBlip2Processor`]; the Q-Former reads each prompt (its `<image>` markers left out), or, given,
        `instruction` (one for every prompt: what vLLM passes, which calls the processor on its images alone)."""
        encoded = super().__call__(images=images, text=text, **kwargs)
        if text is None:
            return encoded
        texts = [text] if isinstance(text, str) else list(text)
        instructions = texts if instruction is None else [instruction] * len(texts)
        encoded.update(self.qformer_inputs(instructions, padding=kwargs.get("padding", False),
                                           return_tensors=kwargs.get("return_tensors")))
        return encoded

    def qformer_inputs(self, instructions: list[str], padding=False, return_tensors=None) -> dict:
        """`qformer_input_ids` / `qformer_attention_mask` of each instruction, its `<image>` (and `<video>`) markers
        left out (the Q-Former reads the words only)."""
        instructions = [t.replace(self.image_token, "") for t in instructions]
        if self.video_token:
            instructions = [t.replace(self.video_token, "") for t in instructions]
        qformer = self.qformer_tokenizer(instructions, padding=padding or (len(instructions) > 1 and "longest"),
                                         return_tensors=return_tensors)
        return {"qformer_input_ids": qformer["input_ids"], "qformer_attention_mask": qformer["attention_mask"]}

    @property
    def model_input_names(self):
        return [*super().model_input_names, "qformer_input_ids", "qformer_attention_mask"]
