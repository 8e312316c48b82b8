"""The Flamingo-style family's processor: one `<image>` token per image, `<|endofchunk|>` closing each chunk."""

from .processing_base import FusionProcessor, chat_template, tokenizer_adds_bos
from .special_tokens import add_flamingo_tokens


class FusionFlamingoProcessor(FusionProcessor):
    """
    Processor of the Flamingo-style family: one `<image>` token per image (the ids are exactly the tokenizer's),
    `<|endofchunk|>` closing each image-text chunk. Images may come flat or nested per sample
    (`images=[[img1, img2]]`); either way they reach the model flat, in the order of their `<image>` tokens.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 end_of_chunk_token="<|endofchunk|>", image_seq_length=1, video_processor=None, video_token="<video>",
                 video_tokens_per_frame=0, video_tokens_per_clip=0):
        if image_seq_length != 1:
            raise ValueError(f"Flamingo-style models take one <image> token per image, got image_seq_length={image_seq_length}.")
        self.end_of_chunk_token = end_of_chunk_token
        _, self.end_of_chunk_token_id = add_flamingo_tokens(tokenizer, image_token, end_of_chunk_token)
        super().__init__(image_processor, tokenizer, image_token=image_token, image_seq_length=1,
                         chat_template=chat_template, video_processor=video_processor, video_token=video_token,
                         video_tokens_per_frame=video_tokens_per_frame, video_tokens_per_clip=video_tokens_per_clip)

    @staticmethod
    def default_chat_template(tokenizer) -> str:
        return chat_template(image="<image>", end_of_turn="'<|endofchunk|>'", bos=tokenizer_adds_bos(tokenizer))

    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, config, **kwargs):
        processor = super().from_vision_text_pretrained(vision_model_name_or_path, text_model_name_or_path, config,
                                                        **kwargs)
        if processor.end_of_chunk_token_id != config.end_of_chunk_token_id:
            raise ValueError(f"The tokenizer gives {processor.end_of_chunk_token!r} the id "
                             f"{processor.end_of_chunk_token_id}, the config expects {config.end_of_chunk_token_id}.")
        return processor
