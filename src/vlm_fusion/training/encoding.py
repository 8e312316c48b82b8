"""Conversations -> what the model reads: token ids with each image's placeholders, and labels.

The text is rendered as the layout says (`plain`: images + caption + end; `chat`: the model's chat template) and
tokenized as the family's processor tokenizes it; the loss is on the characters of the assistant turns: a token is
a target when it starts inside an assistant span. The spans of a chat come from rendering the conversation's
prefixes: the `i`-th assistant turn is what `messages[: i + 1]` adds to `messages[:i]` with its generation prompt —
so any chat template that renders a conversation turn by turn works, no markers needed. Each `<image>` then becomes
the processor's placeholders for that image (ignored by the loss), so the ids equal the processor's own.
"""

from dataclasses import dataclass

from .data import IMAGE, Conversation, DataError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    text: str  # what the processor is given
    input_ids: list[int]  # placeholders expanded
    labels: list[int]
    add_special_tokens: bool
    instruction: str  # the user turns' text (InstructBLIP's Q-Former reads it)


def render(processor, conversation: Conversation, layout: str, plain_end: str) -> tuple[str, list[tuple[int, int]]]:
    """The text of `conversation` in `layout` and the character spans the loss is on."""
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

    def rendered(upto, generation_prompt=False):
        return processor.prompt_text(processor.tokenizer.apply_chat_template(
            messages[:upto], chat_template=processor.chat_template, tokenize=False,
            add_generation_prompt=generation_prompt))

    text, spans = rendered(len(messages)), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = rendered(i, generation_prompt=True), rendered(i + 1)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"sample {conversation.id}: the chat template does not render this conversation turn by "
                            "turn (a turn's text is not a prefix of the whole), so its assistant turns cannot be found")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


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
