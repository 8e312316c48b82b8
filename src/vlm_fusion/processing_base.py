"""The processor every family shares: an image processor, a tokenizer, and `<image>` expansion.

Each `<image>` in the text becomes `image_seq_length` placeholder tokens — as many as the model produces visual
tokens for one image (LLaVA-style: one per patch; BLIP-2-style: one per query). The count check between images
and placeholders, and the refusal to truncate through a placeholder, come from transformers' `ProcessorMixin`.
Each family's processor is in its own file beside this one (`processing_llava.py`, `processing_blip2.py`,
`processing_flamingo.py`, `processing_idefics.py`; BLIP-2's stage 1: `processing_qformer.py`), as the models are.
"""

from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData

from .checkpoints import without_machine_details
from .processing_video import FusionVideoProcessor, num_frames_of
from .remote_code import registered_for_auto_classes
from .special_tokens import add_special_token


def chat_template(image: str = "<image>\\n", end_of_turn: str = "eos_token", bos: bool = False,
                  video: str = "<video>\\n") -> str:
    """A plain `ROLE: ` template (`"USER: <image>\\n...\\nASSISTANT:"`); message content is a string or a list of
    `{"type": "text", "text": ...}`, `{"type": "image"}` and `{"type": "video"}` parts; `end_of_turn` (a Jinja expression) closes
    assistant turns; `bos` starts the text with the tokenizer's BOS (for a tokenizer that adds one, as Llama's own
    templates do: engines such as vLLM tokenize a chat's text without special tokens)."""
    return (
        ("{{ bos_token }}" if bos else "") +
        "{% for message in messages %}"
        "{{ message['role'].upper() + ': ' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{image}' }}}}"
        f"{{% elif part['type'] == 'video' %}}{{{{ '{video}' }}}}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        f"{{% if message['role'] == 'assistant' %}}{{{{ {end_of_turn} }}}}{{% endif %}}{{{{ '\\n' }}}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


def check_marker_count(text, marker: str, given: int, what: str) -> None:
    """The prompts (`text`, one or a list) hold as many `marker`s as `given` items (`what`: "images", "videos")."""
    texts = [text] if isinstance(text, str) else text
    found = sum(sample.count(marker) for sample in texts)
    if found != given:
        raise ValueError(f"The total number of {marker} tokens in the prompts should be the same as the number of "
                         f"{what} passed. Found total {found} {marker} tokens and {given} {what}.")


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _subclasses(cls) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


class FusionProcessor(ProcessorMixin):
    r"""
    Processor of the vlm-fusion models: images through `image_processor`, text through `tokenizer`, with every
    `image_token` expanded to `image_seq_length` placeholders.

    Args:
        image_processor: any transformers image processor.
        tokenizer: the language model's tokenizer; `image_token` is added as a special token if missing.
        chat_template (`str`, *optional*): defaults to a USER/ASSISTANT template.
        image_token (`str`, *optional*, defaults to `"<image>"`).
        image_seq_length (`int`, *optional*, defaults to 1): placeholders per image (the model's visual tokens).
        chunked_tokenization (`bool`, *optional*, defaults to `False`):
            Tokenize the text between `<image>` placeholders chunk by chunk, each as if it began a text, as the
            original LLaVA's `tokenizer_image_token` does (a SentencePiece tokenizer then starts every chunk with
            `▁`): the token sequence models trained that way saw.
        pad_to_square (`bool`, *optional*, defaults to `False`):
            Pad each image to a square with the image processor's mean colour before it is resized, as LLaVA-1.5
            does (`image_aspect_ratio: pad`), instead of letting the image processor crop it.
        video_processor ([`FusionVideoProcessor`], *optional*): clips to `pixel_values_videos`; without it the
            processor takes no `videos=`.
        video_token (`str`, *optional*, defaults to `"<video>"`): a clip's marker in the text, added as a special
            token when there is a video processor.
        video_tokens_per_frame, video_tokens_per_clip (`int`, *optional*): a clip of F frames takes
            `F * video_tokens_per_frame + video_tokens_per_clip` placeholders (`num_video_tokens`: the model's visual
            tokens for it, its config's `video_token_counts()`).
    """

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", image_seq_length=1,
        chunked_tokenization=False, pad_to_square=False, video_processor=None, video_token="<video>",
        video_tokens_per_frame=0, video_tokens_per_clip=0, **sub_processors,
    ):
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"`image_seq_length` must be a positive integer, got {image_seq_length!r}.")
        for name, value in (("video_tokens_per_frame", video_tokens_per_frame),
                            ("video_tokens_per_clip", video_tokens_per_clip)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if video_processor is not None and video_tokens_per_frame + video_tokens_per_clip == 0:
            raise ValueError("A processor with a video processor needs the model's video token counts: give "
                             "`video_tokens_per_frame` and/or `video_tokens_per_clip` (the config's "
                             "`video_token_counts()`).")
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        self.chunked_tokenization = bool(chunked_tokenization)
        self.pad_to_square = bool(pad_to_square)
        self.image_token_id = add_special_token(tokenizer, image_token)
        self.video_token = video_token if video_processor is not None else None
        self.video_tokens_per_frame = video_tokens_per_frame
        self.video_tokens_per_clip = video_tokens_per_clip
        self.video_token_id = add_special_token(tokenizer, video_token) if video_processor is not None else None
        if chat_template is None:  # USER / ASSISTANT turns, with the BOS the tokenizer would add
            chat_template = self.default_chat_template(tokenizer)
        self.video_processor = video_processor  # optional, so not one of ProcessorMixin's attributes (see below)
        super().__init__(image_processor, tokenizer, chat_template=chat_template,
                         **sub_processors)  # a subclass's further tokenizers (InstructBLIP's Q-Former tokenizer)

    # ---- videos ---------------------------------------------------------------------------------------------
    # transformers' ProcessorMixin takes every sub-processor as required, checks it against `VideoProcessorMixin`
    # through a mapping that needs torchvision, and loads it with `AutoVideoProcessor` (torchvision again). The video
    # processor is optional here and runs on PIL, so it is kept out of the mixin's attributes and saved and loaded
    # beside them (`video_preprocessor_config.json`, transformers' file name).
    @classmethod
    def get_attributes(cls):
        return [name for name in super().get_attributes() if name != "video_processor"]

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholders a clip of `num_frames` frames takes in the text (the model's visual tokens for it)."""
        return num_frames * self.video_tokens_per_frame + self.video_tokens_per_clip

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self.num_video_tokens(num_frames_of(video_inputs, video_idx))


    @staticmethod
    def default_chat_template(tokenizer) -> str:
        return chat_template(bos=tokenizer_adds_bos(tokenizer))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholders one `height` x `width` image takes in the text (the model's visual tokens for it)."""
        return self.image_seq_length

    def prompt_text(self, text: str) -> str:
        """The text as this processor hands it to its tokenizer, `<image>` not yet expanded (as written here; the
        IDEFICS processor adds BOS and the image wrappers)."""
        return text

    def adds_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer adds its special tokens (BOS) to `text`: not when the text already starts with BOS
        (a chat template that writes it)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """
        transformers' processor API (vLLM sizes each item's placeholders with it): for `image_sizes`, a list of
        `(height, width)`, each image's placeholder count (`num_image_tokens`) and its entries in `pixel_values`
        (`num_image_patches`, 1: one row per image); for `video_sizes`, a list of `(num_frames, height, width)`, each
        clip's placeholder count (`num_video_tokens`) when this processor takes clips (a video processor).
        """
        counts = {}
        if image_sizes is not None:
            counts["num_image_tokens"] = [self.num_image_tokens(int(h), int(w)) for h, w in image_sizes]
            counts["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None and getattr(self, "video_processor", None) is not None:
            counts["num_video_tokens"] = [self.num_video_tokens(int(num_frames)) for num_frames, _, _ in video_sizes]
        return MultiModalData(**counts)

    def validate_inputs(self, images=None, text=None, videos=None, **kwargs):
        super().validate_inputs(images=images, text=text, videos=videos, **kwargs)
        # transformers 5.19 leaves these checks out (a surplus `<image>` then dies in its expansion, StopIteration)
        if text is None:
            return
        if videos is not None and self.video_token is not None:
            check_marker_count(text, self.video_token, len(FusionVideoProcessor.batched(videos)), "videos")
        if images is not None:
            check_marker_count(text, self.image_token, len(make_flat_list_of_images(images)), "images")

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            if getattr(self, "video_processor", None) is None:
                raise ValueError(f"This {type(self).__name__} has no video processor, so it takes no `videos=`: build "
                                 "it with one (`FusionVideoProcessor`), as `tiny_model_and_processor` and the converters "
                                 "do.")
            if self.chunked_tokenization:
                raise ValueError("`chunked_tokenization` (the original LLaVA's) takes images only, not `videos=`.")
            kwargs["videos"] = videos
        if text is not None and "add_special_tokens" not in kwargs:  # a text the chat template began with BOS
            adds = {self.adds_special_tokens(t) for t in ([text] if isinstance(text, str) else text)}
            if len(adds) > 1:  # one tokenizer call takes one add_special_tokens for the whole batch
                raise ValueError(f"some of the texts start with {self.tokenizer.bos_token} and some do not: write it "
                                 "in all of them or in none (or pass add_special_tokens)")
            kwargs["add_special_tokens"] = adds.pop()
        if images is not None and self.pad_to_square:
            images = self.padded_to_square(images)
        if self.chunked_tokenization and text is not None:
            return self.chunked_call(images, text, **kwargs)
        return super().__call__(images=images, text=text, **kwargs)

    def padded_to_square(self, images):
        """`images` (one, a list, or nested lists) each padded to a square, centred, with the mean colour."""
        if isinstance(images, (list, tuple)):
            return [self.padded_to_square(image) for image in images]
        from PIL import Image
        from transformers.image_transforms import to_pil_image

        image = images if isinstance(images, Image.Image) else to_pil_image(images)
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        colour = tuple(int(x * 255) for x in self.image_processor.image_mean)  # as LLaVA truncates it
        square = Image.new(image.mode, (side, side), colour)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    def chunked_call(self, images, text, return_tensors=None, padding=False, max_length=None, truncation=None,
                     **kwargs):
        """`__call__` with `chunked_tokenization`: each text split at `image_token`, its chunks tokenized alone."""
        kwargs.pop("add_special_tokens", None)  # each chunk takes the tokenizer's, BOS kept once (`chunked_ids`)
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = make_flat_list_of_images(images) if images is not None else []
        count = sum(t.count(self.image_token) for t in texts)
        if count != len(flat_images):
            raise ValueError(f"The texts hold {count} {self.image_token} tokens and {len(flat_images)} images were given.")
        input_ids = [self.chunked_ids(t) for t in texts]
        if max_length is not None and (too_long := [len(ids) for ids in input_ids if len(ids) > max_length]):
            raise ValueError(f"Prompts of {too_long} tokens exceed max_length={max_length}; they are not truncated "
                             "(cutting through an image's placeholders would break it).")
        features = self.tokenizer.pad({"input_ids": input_ids}, padding=padding, max_length=max_length)
        if flat_images:
            features["pixel_values"] = self.image_processor(flat_images, **kwargs)["pixel_values"]
        return BatchFeature(dict(features), tensor_type=return_tensors)

    def chunked_ids(self, text: str) -> list[int]:
        """The original LLaVA's `tokenizer_image_token`: every chunk tokenized with the tokenizer's special tokens,
        the BOS it adds kept once at the very start, `image_seq_length` placeholders between chunks."""
        chunks = [self.tokenizer(chunk).input_ids for chunk in text.split(self.image_token)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
        ids = chunks[0][:offset]
        for i, chunk in enumerate(chunks):
            if i:
                ids += [self.image_token_id] * self.image_seq_length
            ids += chunk[offset:]
        return ids

    # A variant of a family's processor (InstructBLIP's, IDEFICS') names that family's class here: AutoProcessor maps
    # a family's config to its one registered class and resolves no other name, so the variant is saved as the
    # family's class with its own name beside it (`fusion_processor_class`), and `from_pretrained` dispatches on it.
    variant_of: type["FusionProcessor"] | None = None

    def to_dict(self):
        output = super().to_dict()
        output.pop("video_processor", None)  # its own file
        if getattr(self, "video_processor", None) is None:  # an image-only processor is saved as before videos
            for key in ("video_token", "video_tokens_per_frame", "video_tokens_per_clip", "video_token_id"):
                output.pop(key, None)
        if self.variant_of is not None:
            output["processor_class"] = self.variant_of.__name__
            output["fusion_processor_class"] = type(self).__name__
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`; a saved variant of the family's processor loads as that variant."""
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        name = processor_dict.get("fusion_processor_class")
        if name is None and processor_dict.get("qformer_text_input"):  # saved by vlm-fusion 0.2.0 before the field
            name = "FusionInstructBlipProcessor"
        variant = next((c for c in _subclasses(cls) if c.__name__ == name), None)
        if variant is not None and variant is not cls:
            return variant.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "video_processor" not in kwargs:
            kwargs["video_processor"] = FusionVideoProcessor.load_if_saved(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # `from_pretrained` hands the video processor to `__init__` among the kwargs, which transformers also passes to
    # every sub-processor's loader: a tokenizer would keep it in its `init_kwargs` and fail to save again.
    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):  # transformers >= 5.20
        video_processor = kwargs.pop("video_processor", None)
        processor_dict, kwargs = super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)
        return processor_dict, {**kwargs, "video_processor": video_processor}  # for `__init__` alone

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):  # 5.19
        kwargs.pop("video_processor", None)
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, **kwargs):
        """`ProcessorMixin.save_pretrained`, the video processor beside it; `remote_code=True` also writes the
        processor's code."""
        with registered_for_auto_classes(processor=self if remote_code else None):
            saved = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "video_processor", None) is not None:
            self.video_processor.save_pretrained(save_directory)
        without_machine_details(save_directory)  # a tokenizer loaded offline records `local_files_only`
        return saved

    def push_to_hub(self, repo_id, *args, remote_code: bool = False, **kwargs):
        with registered_for_auto_classes(processor=self if remote_code else None):
            return super().push_to_hub(repo_id, *args, **kwargs)

    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, config,
                                    num_frames: int = 8, **kwargs):
        """The processor of a model composed with `from_vision_text_pretrained` from the same two checkpoints; for a
        model that reads clips (`video_token_id`), with a video processor sampling `num_frames` frames a clip, each
        through the tower's image processor."""
        image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
        if config.video_token_id is not None and "video_processor" not in kwargs:
            per_frame, per_clip = config.video_token_counts()
            kwargs.update(video_processor=FusionVideoProcessor.from_image_processor(image_processor,
                                                                                   num_frames=num_frames),
                          video_tokens_per_frame=per_frame, video_tokens_per_clip=per_clip)
        processor = cls(
            image_processor=image_processor,
            tokenizer=AutoTokenizer.from_pretrained(text_model_name_or_path),
            image_seq_length=config.num_image_tokens(),
            **kwargs,
        )
        for kind in ("image", "video"):
            given, expected = getattr(processor, f"{kind}_token_id"), getattr(config, f"{kind}_token_id")
            if given != expected:
                raise ValueError(f"The tokenizer gives {getattr(processor, f'{kind}_token')!r} the id {given}, the "
                                 f"model config expects `{kind}_token_id={expected}`.")
        return processor
