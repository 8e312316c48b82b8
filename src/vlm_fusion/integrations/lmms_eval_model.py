"""lmms-eval's chat model for vlm-fusion checkpoints (see `vlm_fusion.integrations.lmms_eval`)."""

import json
import os

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_fusion  # noqa: F401  (registers the families with the Auto classes)

# generation_kwargs of a task that `generate` takes as they are (`until` is applied to the decoded text)
GENERATE_KWARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")


def check_checkpoint(pretrained: str) -> None:
    """A local folder that is not a vlm-fusion checkpoint is refused in one line that says what it holds."""
    if not os.path.isdir(pretrained):
        return  # a Hub id: from_pretrained says what is wrong with it
    path = os.path.join(pretrained, "config.json")
    if not os.path.isfile(path):
        held = ", ".join(sorted(os.listdir(pretrained))[:8]) or "nothing"
        raise ValueError(f"pretrained={pretrained} is not a vlm-fusion model: it has no config.json (it holds: {held})")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in vlm_fusion.FAMILIES:
        raise ValueError(f"pretrained={pretrained} is not a vlm-fusion model: its config.json is a {model_type!r} model "
                         f"(vlm-fusion's are {', '.join(vlm_fusion.FAMILIES)})")


class VLMFusion(lmms):
    """A vlm-fusion model answering lmms-eval's chat requests `(context, doc_to_messages, generation_kwargs, doc_id,
    task, split)`."""

    is_simple = False

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", device_map: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int = 256, trust_remote_code: bool = False, **kwargs):
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it along; batches here are `batch_size`
        if kwargs:
            raise ValueError(f"vlm_fusion: unknown model_args {sorted(kwargs)} (it takes pretrained, device, dtype, "
                             "device_map, batch_size, max_new_tokens, trust_remote_code)")
        check_checkpoint(pretrained)
        self.pretrained = pretrained
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loading = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype),
                   "trust_remote_code": str(trust_remote_code).lower() == "true"}
        if device_map:
            loading["device_map"] = device_map
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **loading).eval()
        if not device_map:
            self._model.to(device)
        self._device = self._model.device
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=loading["trust_remote_code"])
        self.processor.tokenizer.padding_side = "left"  # the prompts end where generation starts
        self.batch_size_per_gpu = int(batch_size)  # lmms-eval's --batch_size arrives as a string
        self.max_new_tokens = int(max_new_tokens)
        self.nested_images = self._model.config.model_type == "fusion_flamingo"  # images=[[...], ...] per sample

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def loglikelihood(self, requests):
        raise NotImplementedError("vlm_fusion: lmms-eval runs its chat models on generation tasks only (a "
                                  "loglikelihood / multiple-choice task asks for a simple model); pick a "
                                  "generate_until task")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlm_fusion: multi-round generation is not supported; pick a generate_until task")

    def generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """`generate`'s keyword arguments (greedy unless the task samples) and the stop strings."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        settings = {k: gen_kwargs[k] for k in GENERATE_KWARGS if gen_kwargs.get(k) is not None}
        settings["max_new_tokens"] = int(settings.get("max_new_tokens", self.max_new_tokens))
        if float(settings.get("temperature", 0) or 0) > 0:
            settings["do_sample"] = True
        else:
            settings["do_sample"] = False
            for k in ("temperature", "top_p", "top_k"):
                settings.pop(k, None)
        return settings, until

    def clips(self, conversations: list) -> list:
        """The batch's clips (`{"type": "video", "url": ...}` parts: a file, a URL, frames), flat and in order; refused
        in one line when the processor reads none, or when a part asks for a stretch of its clip."""
        parts = [part for c in conversations for message in c.messages for part in message.content
                 if part.type == "video"]
        if parts and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(f"vlm_fusion: the task gives clips, and {self.pretrained} reads none (its processor has no "
                             "video processor): evaluate a video model (tiny_model_and_processor(..., video=True))")
        if any(part.start_time is not None or part.end_time is not None for part in parts):
            raise ValueError("vlm_fusion: a clip's start_time / end_time is not supported: the video processor samples "
                             "the whole clip; cut it to the stretch first")
        return [part.url for part in parts]

    def inputs(self, conversations: list) -> dict:
        """The batch's prompts through the model's chat template and processor, left-padded."""
        texts = [self.processor.apply_chat_template(c.to_hf_messages(), add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        images = [[image.convert("RGB") for image in c.extract_media()[0]] for c in conversations]
        videos = self.clips(conversations)
        call = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):  # never videos=[] / audios=[], which processors refuse
            call["images"] = images if self.nested_images else [image for own in images for image in own]
        if videos:
            call["videos"] = videos
        return self.processor(**call).to(self._device)

    def generate_until(self, requests) -> list:
        collator = utils.Collator([request.args for request in requests], lambda args: (args[3],),
                                  group_fn=lambda args: args[2], grouping=True)  # by generation_kwargs
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_fusion answering")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, to_messages, gen_kwargs, doc_ids, tasks, splits = zip(*chunk)
            conversations = [ChatMessages(messages=fn(self.task_dict[task][split][doc_id]))
                             for fn, doc_id, task, split in zip(to_messages, doc_ids, tasks, splits)]
            inputs = self.inputs(conversations)
            settings, until = self.generation_settings(gen_kwargs[0])  # the chunk shares its generation_kwargs
            with torch.inference_mode():
                out = self._model.generate(**inputs, **settings, pad_token_id=self.tokenizer.pad_token_id)
            for ids, context in zip(out[:, inputs["input_ids"].shape[1]:], contexts):
                text = self.processor.decode(ids, skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                generated = int((ids != self.tokenizer.pad_token_id).sum())
                results.append(GenerationResult(text=text, token_counts=TokenCounts(output_tokens=generated)))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs[0]), text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)
