"""The LLaVA-style family's processor: one placeholder per visual token (patch), anyres counts by the image's size."""

from .anyres import num_tokens
from .processing_base import FusionProcessor


class FusionLlavaProcessor(FusionProcessor):
    """
    Processor of the LLaVA-style family: one placeholder per visual token (patch) of each image.

    Args:
        patch_size (`int`, *optional*): the tower's patch size, for a tiling (anyres, LLaVA-NeXT) image processor
            with `image_grid_pinpoints`: each image then gets as many placeholders as its size gives it tokens
            (`anyres.num_tokens`), the count the model packs.
        anyres_max_tiles (`int`, *optional*): the model's `anyres_max_tiles` (LLaVA-OneVision's anyres_max_N).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 image_seq_length=1, chunked_tokenization=False, pad_to_square=False, patch_size=None,
                 video_processor=None, video_token="<video>",
                 video_tokens_per_frame=0, video_tokens_per_clip=0, anyres_max_tiles=None):
        self.patch_size = patch_size
        self.anyres_max_tiles = anyres_max_tiles
        if patch_size is not None and chunked_tokenization:
            raise ValueError("`chunked_tokenization` and anyres (`patch_size`) do not go together.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_token=image_token,
                         image_seq_length=image_seq_length, chunked_tokenization=chunked_tokenization,
                         pad_to_square=pad_to_square, video_processor=video_processor, video_token=video_token,
                         video_tokens_per_frame=video_tokens_per_frame, video_tokens_per_clip=video_tokens_per_clip)

    @property
    def anyres(self) -> dict | None:
        """The tiling arithmetic's arguments (anyres), or `None` when every image takes `image_seq_length`."""
        pinpoints = getattr(self.image_processor, "image_grid_pinpoints", None)
        if self.patch_size is None or not pinpoints:
            return None
        crop, size = getattr(self.image_processor, "crop_size", None), self.image_processor.size
        # the side of one tile, as LLaVA-NeXT's image processor picks it
        tile = (crop and crop.get("height")) or size.get("height") or size.get("shortest_edge")
        return dict(pinpoints=pinpoints, tile=tile, patch=self.patch_size, max_tiles=self.anyres_max_tiles)

    def num_image_tokens(self, height: int, width: int) -> int:
        if self.anyres is None:
            return super().num_image_tokens(height, width)
        if self.pad_to_square:
            height = width = max(height, width)
        return num_tokens((height, width), **self.anyres)

    def to_dict(self):
        output = super().to_dict()
        if self.anyres_max_tiles is None:  # saved as before anyres_max
            output.pop("anyres_max_tiles", None)
        return output

    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        counts = processed.pop("batch_num_images", None)  # LLaVA-OneVision's image processor: images per sample
        if counts is not None and any(int(n) != 1 for n in counts):
            raise ValueError("Several images in one sample take LLaVA-OneVision's base-tile-only layout, which the "
                             "LLaVA-style family does not implement: give one image per sample.")
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.anyres is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        size = image_inputs["image_sizes"][image_idx]
        height, width = size.tolist() if hasattr(size, "tolist") else size
        return self.image_token * num_tokens((height, width), **self.anyres)
