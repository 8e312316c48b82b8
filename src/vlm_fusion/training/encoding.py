"""Conversations -> what the model reads: token ids with each image's placeholders, and labels.

The text is rendered as the layout says (`plain`: images + caption + end; `chat`: the model's chat template) and
tokenized as the family's processor tokenizes it; the loss is on the characters of the assistant turns: a token is
a target when it starts inside an assistant span. The spans of a chat come from rendering the conversation's
prefixes: the `i`-th assistant turn is what `messages[: i + 1]` adds to `messages[:i]` with its generation prompt —
so any chat template that renders a conversation turn by turn works, no markers needed. Each `<image>` then becomes
the processor's placeholders for that image (ignored by the loss), so the ids equal the processor's own.

`encode` is the reference: plain and slow (every prefix through `apply_chat_template`, a Python loop over tokens).
`Encoder` gives the same ids and labels faster — the chat template's compiled Jinja called directly (each prefix
`render` needs, for every sample), the Rust tokenizer called directly, the labels computed with numpy, the placeholder
counts remembered per image size — and checks itself against `encode` on its first sample and then every
`VERIFY_EVERY`-th: a difference switches it to the reference for good, with a warning. It returns a sample as a
*row* (the text's own ids with one `<image>` token per image, a target flag per id, each image's placeholder count),
which `expand` turns into the ids and labels the model reads: a row is a quarter of the expanded size (576 placeholders
per CLIP-336 image), which is what the on-disk cache (`cache.py`) holds.
"""

import logging
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .data import IMAGE, Conversation, DataError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    text: str  # what the processor is given
    input_ids: list[int]  # placeholders expanded
    labels: list[int]
    add_special_tokens: bool
    instruction: str  # the user turns' text (InstructBLIP's Q-Former reads it)


def render(processor, conversation: Conversation, layout: str, plain_end: str,
           renderer=None) -> tuple[str, list[tuple[int, int]]]:
    """The text of `conversation` in `layout` and the character spans the loss is on; `renderer(messages,
    add_generation_prompt)` renders with the chat template (default: the tokenizer's `apply_chat_template`)."""
    messages = conversation.messages
    if layout == "plain":
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise DataError(f"sample {conversation.id}: the plain layout takes a user turn and an assistant turn "
                            f"(an image-caption pair), got {len(turns)} turns")
        markers = IMAGE * turns[0]["content"].count(IMAGE)
        text = processor.prompt_text(markers + turns[1]["content"] + plain_end)
        start = len(text) - len(turns[1]["content"] + plain_end)
        return text, [(start, len(text))]
    if not processor.chat_template:
        raise DataError("the processor has no chat template: the chat layout needs one (set `chat_template`)")

    renderer = renderer or (lambda upto_messages, generation_prompt: processor.tokenizer.apply_chat_template(
        upto_messages, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=generation_prompt))
    text, bounds = turn_bounds(processor, conversation, renderer)
    # each assistant turn from its start to its end, the trailing space (the template's own newline or separator) out
    return text, [(start, len(text[:end].rstrip())) for start, end in bounds]


def turn_bounds(processor, conversation: Conversation, renderer) -> tuple[str, list[tuple[int, int]]]:
    """The chat text of `conversation` and, for each assistant turn, where it starts (the end of the text up to it
    with the generation prompt) and where the text through it ends (before `render` strips trailing space)."""
    messages, renders = conversation.messages, {}

    def rendered(upto, generation_prompt=False):
        if (upto, generation_prompt) not in renders:
            renders[upto, generation_prompt] = processor.prompt_text(renderer(messages[:upto], generation_prompt))
        return renders[upto, generation_prompt]

    text, bounds = rendered(len(messages)), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = rendered(i, generation_prompt=True), rendered(i + 1)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"sample {conversation.id}: the chat template does not render this conversation turn by "
                            "turn (a turn's text is not a prefix of the whole), so its assistant turns cannot be found")
        bounds.append((len(before), len(through)))
    return text, bounds


def token_offsets(processor, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` as the processor tokenizes it, `<image>` unexpanded, with each token's character span."""
    tokenizer = processor.tokenizer
    if not getattr(processor, "chunked_tokenization", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    # The original LLaVA's tokenizer_image_token (`FusionProcessor.chunked_ids`): each chunk alone, BOS kept once.
    chunks, ids, offsets, start = text.split(processor.image_token), [], [], 0
    for i, chunk in enumerate(chunks):
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, chunk_offsets = encoded["input_ids"], [(a + start, b + start) for a, b in encoded["offset_mapping"]]
        if i == 0:
            bos = tokenizer.bos_token_id
            skip = 1 if chunk_ids and bos is not None and chunk_ids[0] == bos else 0
            ids, offsets = chunk_ids[:skip], chunk_offsets[:skip]
        else:
            ids.append(processor.image_token_id)
            offsets.append((start - len(processor.image_token), start))
        ids += chunk_ids[skip:]
        offsets += chunk_offsets[skip:]
        start += len(chunk) + len(processor.image_token)
    return ids, offsets


def encode(processor, conversation: Conversation, image_sizes: list[tuple[int, int]], layout: str,
           plain_end: str) -> Encoded:
    """Ids and labels of one conversation; `image_sizes` `(height, width)` of its images, for their token counts."""
    text, spans = render(processor, conversation, layout, plain_end)
    add_special = processor.adds_special_tokens(text)
    ids, offsets = token_offsets(processor, text, add_special)
    counts = iter(processor._get_num_multimodal_tokens(image_sizes=image_sizes)["num_image_tokens"]
                  if image_sizes else [])
    image_id = processor.image_token_id
    input_ids, labels = [], []
    for token, (start, end) in zip(ids, offsets):
        if token == image_id:
            count = next(counts, None)
            if count is None:
                raise DataError(f"sample {conversation.id}: more {IMAGE} tokens than images after tokenization")
            input_ids += [image_id] * count
            labels += [IGNORE_INDEX] * count
            continue
        target = end > start and any(a <= start < b for a, b in spans)
        input_ids.append(token)
        labels.append(token if target else IGNORE_INDEX)
    if next(counts, None) is not None:
        raise DataError(f"sample {conversation.id}: fewer {IMAGE} tokens than images after tokenization")
    instruction = " ".join(m["content"] for m in conversation.messages if m["role"] == "user")
    return Encoded(text, input_ids, labels, add_special, instruction)


# ---- the data pass's encoder ---------------------------------------------------------------------------------------
VERIFY_EVERY = 1000  # samples between two checks of the fast path against `encode`


def expand(ids, targets, image_tokens, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A row's `(input_ids, labels)`: each `<image>` id repeated to its placeholder count (labels -100 there and
    wherever the row's target flag is off)."""
    ids, targets = np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool)
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[ids == image_token_id] = image_tokens
    input_ids = np.repeat(ids, repeats)
    return input_ids, np.where(np.repeat(targets, repeats), input_ids, IGNORE_INDEX)


class Encoder:
    """`encode`, fast, as rows: `encoder(conversation, image_sizes)` -> `{"text", "add_special_tokens",
    "instruction", "ids", "targets", "image_tokens", "length"}`."""

    def __init__(self, processor, layout: str, plain_end: str):
        self.processor, self.layout, self.plain_end = processor, layout, plain_end
        self.image_token_id = processor.image_token_id
        self._counts: dict[tuple[int, int], int] = {}
        self._seen, self.fast = 0, True
        self._template = self._compiled_template() if layout == "chat" and processor.chat_template else None
        self._special_tokens = dict(processor.tokenizer.special_tokens_map)  # what apply_chat_template passes too
        backend = getattr(processor.tokenizer, "_tokenizer", None)
        self._rust = backend if hasattr(backend, "encode") and not getattr(processor, "chunked_tokenization", False) \
            else None

    def __call__(self, conversation: Conversation, image_sizes: list[tuple[int, int]]) -> dict:
        check = self._seen % VERIFY_EVERY == 0
        self._seen += 1
        if not self.fast:
            return self.reference_row(conversation, image_sizes)
        row = self._fast_row(conversation, image_sizes)
        if check:
            reference = self.reference_row(conversation, image_sizes)
            if not rows_equal(row, reference):
                logging.getLogger("vlm_fusion.training").warning(
                    "sample %s: the fast encoder differs from the reference one (chat template or tokenizer "
                    "behaviour it does not reproduce); encoding the rest the reference way", conversation.id)
                self.fast = False
                return reference
        return row

    def reference_row(self, conversation, image_sizes) -> dict:
        encoded = encode(self.processor, conversation, image_sizes, self.layout, self.plain_end)
        counts = self.image_tokens(image_sizes)
        ids, targets, image, position = [], [], 0, 0
        while position < len(encoded.input_ids):  # fold each image's placeholders back into one `<image>`
            token = encoded.input_ids[position]
            ids.append(token)
            targets.append(encoded.labels[position] != IGNORE_INDEX)
            if token == self.image_token_id:
                position, image = position + counts[image], image + 1
            else:
                position += 1
        return {"text": encoded.text, "add_special_tokens": encoded.add_special_tokens,
                "instruction": encoded.instruction, "ids": np.asarray(ids, dtype=np.int32),
                "targets": np.asarray(targets, dtype=bool), "image_tokens": counts, "length": len(encoded.input_ids)}

    def image_tokens(self, image_sizes) -> list[int]:
        missing = [tuple(size) for size in image_sizes if tuple(size) not in self._counts]
        if missing:
            found = self.processor._get_num_multimodal_tokens(image_sizes=missing)["num_image_tokens"]
            self._counts.update(zip(missing, found))
        return [self._counts[tuple(size)] for size in image_sizes]

    def _fast_row(self, conversation, image_sizes) -> dict:
        text, spans = render(self.processor, conversation, self.layout, self.plain_end, self._render)
        add_special = self.processor.adds_special_tokens(text)
        if self._rust is not None:
            encoding = self._rust.encode(text, add_special_tokens=add_special)
            ids, offsets = encoding.ids, encoding.offsets
        else:
            ids, offsets = token_offsets(self.processor, text, add_special)
        ids = np.fromiter(ids, dtype=np.int32, count=len(ids))
        offsets = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        targets = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            targets |= (starts >= a) & (starts < b)
        targets &= (ends > starts) & (ids != self.image_token_id)
        found = int((ids == self.image_token_id).sum())
        if found != len(image_sizes):
            more = "more" if found > len(image_sizes) else "fewer"
            raise DataError(f"sample {conversation.id}: {more} {IMAGE} tokens than images after tokenization")
        counts = self.image_tokens(image_sizes)
        instruction = " ".join(m["content"] for m in conversation.messages if m["role"] == "user")
        return {"text": text, "add_special_tokens": add_special, "instruction": instruction, "ids": ids,
                "targets": targets, "image_tokens": counts, "length": len(ids) - found + sum(counts)}

    def _compiled_template(self):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            return _compile_jinja_template(self.processor.chat_template)
        except Exception:  # the reference path reports a template that does not compile
            return None

    def _render(self, messages, add_generation_prompt: bool) -> str:
        if self._template is None:
            return self.processor.tokenizer.apply_chat_template(
                messages, chat_template=self.processor.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special_tokens)


def rows_equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in b)
