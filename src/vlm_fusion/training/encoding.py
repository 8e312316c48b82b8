"""Conversations -> what the model reads: token ids with each image's placeholders, and labels.

The text is rendered as the layout says (`plain`: images + caption + end; `chat`: the model's chat template) and
tokenized as the family's processor tokenizes it; the loss is on the characters of the assistant turns: a token is
a target when it starts inside an assistant span. The spans of a chat come from rendering the conversation's
prefixes: the `i`-th assistant turn is what `messages[: i + 1]` adds to `messages[:i]` with its generation prompt —
so any chat template that renders a conversation turn by turn works, no markers needed. Each `<image>` then becomes
the processor's placeholders for that image (ignored by the loss), so the ids equal the processor's own.

`encode` is the reference: plain and slow (every prefix through `apply_chat_template`, a Python loop over tokens).
`Encoder` gives the same ids and labels at the speed a data pass over LLaVA's 665K conversations needs — the chat
template's compiled Jinja called directly, once per sequence of roles (its prefixes with placeholder contents: a
`Skeleton`) and then once per sample as a check, or not at all where the template only prints the contents
(`blind_to_contents`) — the Rust tokenizer called directly, the labels computed with numpy, the
placeholder counts remembered per image size — and checks itself against `encode` on its first sample and then every
`VERIFY_EVERY`-th: a difference switches it to the reference for good, with a warning. It returns a sample as a
*row* (the text's own ids with one `<image>` token per image, a target flag per id, each image's placeholder count),
which `expand` turns into the ids and labels the model reads: a row is a quarter of the expanded size (576 placeholders
per CLIP-336 image), which is what the on-disk cache (`cache.py`) holds.

Why the skeleton and the blind probe (~150 lines) stay — issue 39, measured on `benchmarks/data.py`'s 665K samples,
one process, on 2 cores loaded by other work (CPU s ~1.6x benchmarks/README's table): the first data pass took 584 CPU s
with them and 806 without (every prefix rendered per sample, `render`'s way): 0.88 and 1.21 ms a sample. This
`Encoder` alone (every 10th sample, the variants called in turn on each): 0.918 ms a sample, 1.029 with
`blind_to_contents` always False (the skeleton checked by one whole render per sample), 1.243 without a skeleton. The
machinery saves 26 % of the encoder's CPU (~216 s over 665K here), the blind probe alone 11 % (~74 s). A streamed
caption pair in the chat layout: 0.534 ms with it, 0.674 without, nothing beside a training step (and the align stage
streams in the plain layout, which none of this touches).
"""

import logging
import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .data import IMAGE, VIDEO, Conversation, DataError

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
        markers = "".join(re.findall(f"{re.escape(IMAGE)}|{re.escape(VIDEO)}", turns[0]["content"]))
        text = processor.prompt_text(markers + turns[1]["content"] + plain_end)
        start = len(text) - len(turns[1]["content"] + plain_end)
        return text, [(start, len(text))]
    if not processor.chat_template:
        raise DataError("the processor has no chat template: the chat layout needs one (set `chat_template`)")

    renderer = renderer or (lambda upto_messages, generation_prompt: processor.tokenizer.apply_chat_template(
        upto_messages, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=generation_prompt))
    text, bounds = turn_bounds(processor, conversation, renderer)
    return text, assistant_spans(text, bounds)


def assistant_spans(text: str, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans the loss is on, from `turn_bounds`' bounds: each assistant turn from its start to its end, the
    trailing space (the template's own newline or separator) left out."""
    return [(start, len(text[:end].rstrip())) for start, end in bounds]


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
    if VIDEO in text:
        raise DataError(f"the original LLaVA's chunked tokenization takes images only, not clips ({VIDEO})")
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
    clips = len(conversation.videos)
    video_id, per_clip = (processor.video_token_id, clip_tokens(processor, conversation.id)) if clips else (None, 0)
    image_id = processor.image_token_id
    input_ids, labels = [], []
    for token, (start, end) in zip(ids, offsets):
        if token == video_id:
            clips -= 1
            input_ids += [video_id] * per_clip
            labels += [IGNORE_INDEX] * per_clip
            continue
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
    if clips:
        raise DataError(f"sample {conversation.id}: {VIDEO} tokens and clips differ in number after tokenization")
    instruction = " ".join(m["content"] for m in conversation.messages if m["role"] == "user")
    return Encoded(text, input_ids, labels, add_special, instruction)


def clip_tokens(processor, sid: str) -> int:
    """The placeholders of one clip: the model's visual tokens for the `num_frames` frames its processor samples."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        raise DataError(f"sample {sid} has a clip ({VIDEO}) and the model reads no video: compose it from parts with "
                        "--num-frames N, or start from a checkpoint that reads clips")
    if not video_processor.do_sample_frames or video_processor.num_frames is None:
        raise DataError(f"sample {sid}: the video processor samples clips by fps or keeps every frame; training needs "
                        "a fixed frame count per clip (--num-frames N)")
    return processor.num_video_tokens(video_processor.num_frames)


# ---- the data pass's encoder ---------------------------------------------------------------------------------------
VERIFY_EVERY = 1000  # samples between two checks of the fast path against `encode`


def expand(row: dict, processor) -> tuple[np.ndarray, np.ndarray]:
    """A row's `(input_ids, labels)`: each `<image>` id repeated to its placeholder count, and each `<video>` id to
    its clip's (labels -100 there and wherever the row's target flag is off)."""
    ids, targets = np.asarray(row["ids"], dtype=np.int64), np.asarray(row["targets"], dtype=bool)
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[ids == processor.image_token_id] = row["image_tokens"]
    if len(row["video_tokens"]):
        repeats[ids == processor.video_token_id] = row["video_tokens"]
    input_ids = np.repeat(ids, repeats)
    return input_ids, np.where(np.repeat(targets, repeats), input_ids, IGNORE_INDEX)


class Encoder:
    """`encode`, fast, as rows: `encoder(conversation, image_sizes)` -> `{"text", "add_special_tokens",
    "instruction", "ids", "targets", "image_tokens", "video_tokens", "length"}`."""

    def __init__(self, processor, layout: str, plain_end: str):
        self.processor, self.layout, self.plain_end = processor, layout, plain_end
        self.image_token_id = processor.image_token_id
        self._counts: dict[tuple[int, int], int] = {}
        self._seen, self.fast = 0, True
        self._chat_layout = layout == "chat" and bool(processor.chat_template)
        self._template = self._compiled_template() if self._chat_layout else None
        self._skeletons: dict[tuple[str, ...], Skeleton | None] = {}
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
        video_counts = self.video_tokens(conversation)
        ids, targets, image, position = [], [], 0, 0
        while position < len(encoded.input_ids):  # fold each image's (clip's) placeholders back into one `<image>`
            token = encoded.input_ids[position]
            ids.append(token)
            targets.append(encoded.labels[position] != IGNORE_INDEX)
            if token == self.image_token_id:
                position, image = position + counts[image], image + 1
            elif video_counts and token == self.processor.video_token_id:
                position += video_counts[0]
            else:
                position += 1
        return {"text": encoded.text, "add_special_tokens": encoded.add_special_tokens,
                "instruction": encoded.instruction, "ids": np.asarray(ids, dtype=np.int32),
                "targets": np.asarray(targets, dtype=bool), "image_tokens": counts, "video_tokens": video_counts,
                "length": len(encoded.input_ids)}

    def video_tokens(self, conversation) -> list[int]:
        """Each clip's placeholder count (all clips are sampled to the processor's `num_frames`)."""
        if not conversation.videos:
            return []
        return [clip_tokens(self.processor, conversation.id)] * len(conversation.videos)

    def image_tokens(self, image_sizes) -> list[int]:
        missing = [tuple(size) for size in image_sizes if tuple(size) not in self._counts]
        if missing:
            found = self.processor._get_num_multimodal_tokens(image_sizes=missing)["num_image_tokens"]
            self._counts.update(zip(missing, found))
        return [self._counts[tuple(size)] for size in image_sizes]

    def _fast_row(self, conversation, image_sizes) -> dict:
        text, spans = self._chat(conversation) if self._chat_layout else \
            render(self.processor, conversation, self.layout, self.plain_end, self._render)
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
        video_counts = self.video_tokens(conversation)
        clips = 0
        if video_counts:
            is_clip = ids == self.processor.video_token_id
            targets &= ~is_clip
            clips = int(is_clip.sum())
            if clips != len(video_counts):
                raise DataError(f"sample {conversation.id}: {clips} {VIDEO} tokens and {len(video_counts)} clips "
                                "after tokenization")
        instruction = " ".join(m["content"] for m in conversation.messages if m["role"] == "user")
        return {"text": text, "add_special_tokens": add_special, "instruction": instruction, "ids": ids,
                "targets": targets, "image_tokens": counts, "video_tokens": video_counts,
                "length": len(ids) - found - clips + sum(counts) + sum(video_counts)}

    def _chat(self, conversation) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text and spans, from the skeleton of the conversation's roles. Where the template is blind to
        the contents (`Skeleton.blind`) that is all; else the template runs once, over the whole conversation, and
        that text must equal the skeleton's with the contents put in (else, or without a skeleton, `render`: every
        prefix through the template)."""
        messages = conversation.messages
        roles = tuple(message["role"] for message in messages)
        if roles not in self._skeletons:
            self._skeletons[roles] = Skeleton.of(self.processor, roles, self._render)
        skeleton = self._skeletons[roles]
        if skeleton is not None:
            contents = [message["content"] for message in messages]
            text = skeleton.fill(contents)
            if skeleton.blind or text == self.processor.prompt_text(self._render(messages, False)):
                return text, skeleton.spans(text, contents)
        return render(self.processor, conversation, self.layout, self.plain_end, self._render)

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


class Skeleton:
    """A chat template's text for one sequence of roles, each message's content a sentinel: the text around the
    contents and, per assistant turn, `turn_bounds`' two positions, each as (position in the skeleton, contents
    before it). A conversation with those roles renders as the skeleton with its contents put in, wherever the
    template writes a message's content as it is and decides nothing from it; `Encoder._chat` checks that per sample
    against the template's own rendering of the whole conversation, and `Encoder` the spans against `encode`."""

    def __init__(self, pieces: list[str], sentinel_lengths: list[int], bounds: list[tuple[tuple[int, int], ...]]):
        self.pieces, self.sentinel_lengths, self.bounds = pieces, sentinel_lengths, bounds
        self.blind = False  # the template only prints the contents (`blind_to_contents`): no per-sample render needed

    @classmethod
    def of(cls, processor, roles: tuple[str, ...], renderer) -> "Skeleton | None":
        """The skeleton of `roles`, or None where the template does not write each content once, in order, outside
        the turn bounds (or fails on the sentinels): those conversations go through `render`."""
        sentinels = [f"\ue000{i}\ue001" for i in range(len(roles))]
        probe = Conversation("skeleton", [{"role": r, "content": s} for r, s in zip(roles, sentinels)])
        try:
            text, bounds = turn_bounds(processor, probe, renderer)
        except Exception:  # noqa: BLE001 - the conversations themselves then report what is wrong, via `render`
            return None
        starts = [text.find(sentinel) for sentinel in sentinels]
        ends = [start + len(sentinel) for start, sentinel in zip(starts, sentinels)]
        if any(start < 0 or text.count(sentinel) != 1 for start, sentinel in zip(starts, sentinels)) \
                or starts != sorted(starts):
            return None
        points = [point for bound in bounds for point in bound]
        if any(start < point < end for point in points for start, end in zip(starts, ends)):
            return None
        pieces = [text[a:b] for a, b in zip([0] + ends, starts + [len(text)])]
        located = [tuple((point, sum(end <= point for end in ends)) for point in bound) for bound in bounds]
        skeleton = cls(pieces, [len(sentinel) for sentinel in sentinels], located)
        skeleton.blind = blind_to_contents(processor, roles, renderer, skeleton)
        return skeleton

    def fill(self, contents: list[str]) -> str:
        parts = [self.pieces[0]]
        for content, piece in zip(contents, self.pieces[1:]):
            parts += (content, piece)
        return "".join(parts)

    def spans(self, text: str, contents: list[str]) -> list[tuple[int, int]]:
        """`render`'s spans in `text` (this skeleton filled with `contents`)."""
        shift = [0]
        for content, length in zip(contents, self.sentinel_lengths):
            shift.append(shift[-1] + len(content) - length)
        spans = []
        for (start, before_start), (end, before_end) in self.bounds:
            spans.append((start + shift[before_start], len(text[: end + shift[before_end]].rstrip())))
        return spans


def blind_to_contents(processor, roles: tuple[str, ...], renderer, skeleton: Skeleton) -> bool:
    """Whether the chat template, for these roles, does nothing with a message's content but print it as it is: then
    every conversation with these roles renders as `skeleton` filled with its contents, and `Encoder` skips the
    per-sample render that checks it.

    Each content is a `ContentProbe`, which notes every operation on it: blind means the template's renders (those
    `turn_bounds` makes) converted each content to text once (`{{ content }}`, `~`) and did nothing else with it — no
    test (`'<image>' in content`, `if content`), no method (`| trim`, `.split()`), no comparison — and their text
    equals the skeleton's filled with the probes' texts, which hold characters any escaping would change (so
    `| tojson` or `| e`, which read a string without calling anything on it, show up there). The processor must not
    change the rendered text either (IDEFICS wraps the `<image>` runs: not blind). What this cannot see: a template
    that builds a string from a content with `~` and then decides something from that string alone; `Encoder`'s
    periodic comparison with `encode` stays on for every template."""
    from vlm_fusion.processing_base import FusionProcessor

    if getattr(type(processor), "prompt_text", None) is not FusionProcessor.prompt_text:
        return False
    uses: list[tuple[str, int]] = []
    probes = [ContentProbe(f"\ue002{i} \"'\\<&>\n\ue003", i, uses) for i in range(len(roles))]
    conversation = Conversation("probe", [{"role": r, "content": p} for r, p in zip(roles, probes)])
    printed_once = True

    def noted(messages, add_generation_prompt):
        nonlocal printed_once
        del uses[:]
        text = renderer(messages, add_generation_prompt)
        printed_once &= sorted(uses) == [("str", i) for i in range(len(messages))]
        return str(text)

    try:
        text, bounds = turn_bounds(processor, conversation, noted)
    except Exception:  # noqa: BLE001 - a template that fails on the probes is not shown blind
        return False
    texts = [str.__str__(probe) for probe in probes]
    return printed_once and text == skeleton.fill(texts) and \
        skeleton.spans(text, texts) == assistant_spans(text, bounds)


class ContentProbe(str):
    """A message content that notes (in `uses`, as `(operation, index)`) what a chat template does with it: `str`
    when it becomes text (`{{ content }}`, `~`, `'...' + content`), the operation's name for anything else (a method,
    `in`, `==`, `len`, truth...)."""

    def __new__(cls, text: str, index: int, uses: list):
        probe = super().__new__(cls, text)
        probe.index, probe.uses = index, uses
        return probe

    def _note(self, operation: str) -> str:
        object.__getattribute__(self, "uses").append((operation, object.__getattribute__(self, "index")))
        return str.__str__(self)  # the text, a plain `str`

    def __getattribute__(self, name):
        if not (name.startswith("__") and name.endswith("__")):  # `__html__`, `__class__`: introspection, not use
            ContentProbe._note(self, name)
        return object.__getattribute__(self, name)

    def __bool__(self):
        return len(ContentProbe._note(self, "__bool__")) > 0

    def __int__(self):
        return int(ContentProbe._note(self, "__int__"))

    def __float__(self):
        return float(ContentProbe._note(self, "__float__"))

    def __radd__(self, other):  # `'x' + content`: str has no __radd__, so Python asks this subclass first
        return other + ContentProbe._note(self, "str")


def _noting(name: str, noted_as: str):
    def operation(self, *args):
        return getattr(str, name)(ContentProbe._note(self, noted_as), *args)
    return operation


for _name in ("__str__", "__add__", "__repr__", "__format__", "__len__", "__iter__", "__contains__", "__getitem__",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__mul__", "__rmul__", "__mod__",
              "__rmod__"):
    setattr(ContentProbe, _name, _noting(_name, "str" if _name in ("__str__", "__add__") else _name))
del _name


def rows_equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in b)
