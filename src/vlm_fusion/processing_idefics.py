"""IDEFICS compatibility: the processor of a converted IDEFICS (a Flamingo-style model) takes the calls transformers'
`IdeficsProcessor` takes and gives its ids."""

import re

from transformers.image_utils import make_flat_list_of_images

from .processing_flamingo import FusionFlamingoProcessor
from .special_tokens import add_special_token


IDEFICS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].capitalize() + ':' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ (' ' if loop.first else '') + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""IDEFICS' instruct layout, `User: ...<end_of_utterance>\\nAssistant: ...<end_of_utterance>\\n`, images where they are."""


class FusionIdeficsProcessor(FusionFlamingoProcessor):
    """
    The processor of a converted IDEFICS: takes the calls `IdeficsProcessor` takes and gives its `input_ids` and
    `attention_mask`, with the images flat (`(num_images, channels, height, width)`, IDEFICS' padding images left out).

    - `text` as interleaved lists of strings and images, one list per sample (`[["User:", image, "Describe."]]`),
      assembled as `IdeficsProcessor` does: each string stripped of spaces, `<end_of_utterance>` between two
      consecutive strings when the tokenizer holds it as a special token (`add_end_of_utterance_token`), an image URL
      loaded as an image;
    - `images` and `text` strings: a string without `<image>` gets its images where `IdeficsProcessor` puts them
      (nested images, `images=[[a, b]]`, after the text; one image per text, `images=[a]`, before it); a string with
      `<image>` keeps them where they are;
    - each run of images is wrapped in `<fake_token_around_image>` (a text that already holds that token is taken as
      written), every sample starts with BOS, written as text, and `add_eos_token` ends it with EOS;
    - `padding="longest"` and `return_tensors="pt"` by default, as `IdeficsProcessor`.

    A list of strings without images is a batch of texts here (`IdeficsProcessor` reads it as one sample).
    """

    variant_of = FusionFlamingoProcessor

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 end_of_chunk_token="<end_of_utterance>", image_seq_length=1,
                 image_wrapper_token="<fake_token_around_image>", add_end_of_utterance_token=None,
                 video_processor=None, video_token="<video>",
                 video_tokens_per_frame=0, video_tokens_per_clip=0):
        self.image_wrapper_token = image_wrapper_token
        self.add_end_of_utterance_token = add_end_of_utterance_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or IDEFICS_CHAT_TEMPLATE,
                         image_token=image_token, end_of_chunk_token=end_of_chunk_token,
                         image_seq_length=image_seq_length, video_processor=video_processor, video_token=video_token,
                         video_tokens_per_frame=video_tokens_per_frame, video_tokens_per_clip=video_tokens_per_clip)
        add_special_token(tokenizer, image_wrapper_token)

    def __call__(self, images=None, text=None, add_eos_token: bool = False, add_end_of_utterance_token=None,
                 **kwargs):
        if text is None:
            return super().__call__(images=images, text=text, **kwargs)
        samples, sample_images = self.idefics_samples(images, text, add_end_of_utterance_token)
        texts = [self.prompt_text(sample, add_eos_token) for sample in samples]
        kwargs = {"padding": "longest", "return_tensors": "pt", **kwargs, "add_special_tokens": False}
        flat = [image for own in sample_images for image in own]
        return super().__call__(images=flat or None, text=texts, **kwargs)

    def idefics_samples(self, images, text, add_end_of_utterance_token=None) -> tuple[list[str], list[list]]:
        """Each sample's text (images marked by `<image>`) and its images, from any form `IdeficsProcessor` takes."""
        from transformers.image_utils import load_image
        from transformers.models.idefics.processing_idefics import is_url

        texts = [text] if isinstance(text, str) else list(text)
        interleaved = any(isinstance(t, (list, tuple)) for t in texts) or any(not isinstance(t, str) for t in texts)
        if interleaved:
            if images is not None:
                raise ValueError("Pass images either inside the interleaved `text` lists or as `images`, not both.")
            samples = [list(t) for t in texts] if all(isinstance(t, (list, tuple)) for t in texts) else [texts]
            eou = add_end_of_utterance_token
            if eou is None:
                eou = self.add_end_of_utterance_token
            if eou is None:  # as IdeficsProcessor: when the tokenizer was trained with it
                eou = self.end_of_chunk_token in self.tokenizer.special_tokens_map.get("additional_special_tokens", [])
            out_texts, out_images = [], []
            for sample in samples:
                parts, own, last = [], [], None  # last: "text" or "image"
                for item in sample:
                    if isinstance(item, str) and not is_url(item.strip(" ")):
                        if eou and last == "text":
                            parts.append(self.end_of_chunk_token)
                        parts.append(item.strip(" "))
                        last = "text"
                    else:
                        own.append(load_image(item.strip(" ")) if isinstance(item, str) else item)
                        parts.append(self.image_token)
                        last = "image"
                out_texts.append("".join(parts))
                out_images.append(own)
            return out_texts, out_images
        if images is None:
            return texts, [[] for _ in texts]
        nested = isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple))
        per_sample = [list(own) for own in images] if nested else [[image] for image in make_flat_list_of_images(images)]
        if len(per_sample) != len(texts):
            raise ValueError(f"{len(texts)} prompts and {len(per_sample)} samples of images: give the images nested, "
                             "one list per prompt (`images=[[img1, img2], [img3]]`).")
        if nested:  # as IdeficsProcessor: nested images go after their text, one image per text before it
            texts = [t if self.image_token in t else t + self.image_token * len(own) for t, own in zip(texts, per_sample)]
        else:
            texts = [t if self.image_token in t else self.image_token + t for t in texts]
        return texts, per_sample

    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        if not hasattr(processed, "keys"):  # IDEFICS' image processor returns the pixel tensor itself
            processed = {"pixel_values": processed}
        return processed, replacements

    def adds_special_tokens(self, text: str) -> bool:
        return False  # BOS is written into the text, as IdeficsProcessor does

    def prompt_text(self, text: str, add_eos_token: bool = False) -> str:
        """BOS, the text with each run of `<image>` wrapped in `<fake_token_around_image>`, and EOS if asked."""
        if self.image_wrapper_token not in text:
            image, wrapper = re.escape(self.image_token), self.image_wrapper_token
            text = re.sub(f"(?:{image})+", lambda run: wrapper + (self.image_token + wrapper) * (
                len(run.group(0)) // len(self.image_token)), text)
        bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        return (text if text.startswith(bos) else bos + text) + (eos if add_eos_token else "")
