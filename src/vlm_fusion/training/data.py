"""Training data: LLaVA's JSON and TRL's conversational datasets, read into one form and checked before training.

LLaVA's format (`llava_v1_5_mix665k.json`, `blip_laion_cc_sbu_558k.json`): a JSON list (or JSON lines) of

    {"id": ..., "image": "path" | ["path", ...] (optional), "conversations": [{"from": "human" | "gpt" | "system",
     "value": "...<image>..."}, ...]}

with image paths relative to `--image-folder`; and its video form (LLaVA-Video-178K, Video-ChatGPT): `"video":
"clips/0001.mp4"` (a video file) or `"clips/0001/"` (a frames folder: numbered images), relative to `--image-folder`
too, marked `<video>` in the text — or `<image>` where the sample has a video and no image, as LLaVA-NeXT's video
data writes it. TRL's conversational format: rows with `messages` (`role`, `content`: a string or `{"type": "text" |
"image" | "video"}` parts), `images` and `videos`, from a local `datasets` dataset (a `save_to_disk` folder, JSON /
JSON lines, or Parquet). Either way a sample becomes a `Conversation`: its id, its images (paths or PIL images), its
clips (paths) and its messages; `<image>` marks where each image goes, `<video>` each clip.

Every sample is checked in one pass before training starts (`check_images` for the image files), so that a missing
image shows up now, named with its sample's id, and not hours in.
"""

import json
import os
from dataclasses import dataclass, field

from PIL import Image

IMAGE = "<image>"
VIDEO = "<video>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's `from` -> chat roles
CHAT_ROLES = {"user", "assistant", "system"}


class DataError(ValueError):
    """Bad training data: one line naming the sample and what is wrong with it."""


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # {"role", "content": str}, `<image>` where each image goes
    images: list = field(default_factory=list)  # paths (checked to exist) or PIL images, in order of `<image>`
    videos: list = field(default_factory=list)  # clip paths (video files or frames folders), in order of `<video>`

    @property
    def image_markers(self) -> int:
        return sum(message["content"].count(IMAGE) for message in self.messages)

    @property
    def video_markers(self) -> int:
        return sum(message["content"].count(VIDEO) for message in self.messages)


def load(path: str, image_folder: str | None = None) -> tuple[list[Conversation], str]:
    """The samples of `path` (a LLaVA JSON / JSON-lines file, or a local TRL-format dataset) and a name for it: all
    of `blocks`, in memory (the evaluation and the in-memory recipes; the data pass reads `blocks` itself)."""
    if not os.path.exists(path):
        raise DataError(f"no training data at {path}")
    conversations = [conversation for block in blocks(path, image_folder, 4096)
                     for _, conversation in block.conversations()]
    return conversations, os.path.basename(os.path.normpath(path))


@dataclass
class Block:
    """`size` raw rows of a data file and how each becomes a `Conversation` (`conversations()`): a data pass's
    worker converts them, so that plain rows, not `Conversation` objects, cross the process boundary."""
    rows: list[tuple[int, dict]]  # (index in the file, row)
    convert: object  # llava_conversation or chat_conversation
    image_folder: str | None

    def conversations(self) -> list[tuple[int, "Conversation"]]:
        return [(index, self.convert(row, index, self.image_folder)) for index, row in self.rows]


def blocks(path: str, image_folder: str | None, size: int):
    """The samples of `path` as `load` reads them, `size` at a time as `Block`s, never the whole file in memory (a
    JSON list is parsed object by object)."""
    if os.path.isfile(path) and path.endswith((".json", ".jsonl")):
        rows, convert = iter_json(path), None
    else:
        rows, convert = iter(read_dataset(path)), chat_conversation
    block = []
    for index, row in enumerate(rows):
        if convert is None:  # the first row says which format the file is in
            if not isinstance(row, dict) or not ("conversations" in row or "messages" in row):
                raise DataError(f"{path}: the first sample has neither `conversations` (LLaVA) nor `messages` (TRL)")
            convert = llava_conversation if "conversations" in row else chat_conversation
        block.append((index, row))
        if len(block) == size:
            yield Block(block, convert, image_folder)
            block = []
    if block:
        yield Block(block, convert, image_folder)


def iter_json(path: str, chunk: int = 1 << 20):
    """The objects of a JSON list (or of JSON lines), one at a time, read `chunk` characters at a time. Invalid JSON is
    one line naming the sample and the place in the file (line and column) where it breaks."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path} is not valid JSON lines (line {number} column {error.colno}: "
                                        f"{error.msg})") from None
            return
        decoder, buffer, position, done, count = json.JSONDecoder(), f.read(chunk), 0, False, 0
        line, column = 1, 1  # where buffer[0] is in the file

        def read_on() -> bool:  # drop what was read, add the next chunk; whether there was one
            nonlocal buffer, position, line, column
            dropped, more = buffer[:position], f.read(chunk)
            newline = dropped.rfind("\n")
            line, column = (line + dropped.count("\n"), position - newline) if newline >= 0 \
                else (line, column + position)
            buffer, position = buffer[position:] + more, 0
            return bool(more)

        def invalid(at: int, why: str) -> DataError:
            newline = buffer.rfind("\n", 0, at)
            place = (line + buffer.count("\n", 0, at), at - newline) if newline >= 0 else (line, column + at)
            return DataError(f"{path} is not valid JSON ({why}, line {place[0]} column {place[1]})")

        def skip(characters):  # whitespace, then `characters` if there (returns whether it was)
            nonlocal position, done
            while True:
                while position < len(buffer) and buffer[position].isspace():
                    position += 1
                if position < len(buffer) or done:
                    break
                done = not read_on()
            if buffer.startswith(characters, position):
                position += len(characters)
                return True
            return False

        if not skip("["):
            raise DataError(f"{path} must hold a list of samples (a JSON list, or JSON lines in a .jsonl file)")
        if skip("]"):
            return
        while True:
            skip("")
            while True:
                try:
                    row, end = decoder.raw_decode(buffer, position)
                    break
                except json.JSONDecodeError as error:  # a broken sample, or one the chunk cut: read on
                    broken = invalid(error.pos, f"sample {count + 1} of the list: {error.msg}")
                    if not read_on():
                        raise broken from None
            yield row
            position, count = end, count + 1
            if skip("]"):
                return
            if not skip(","):
                raise invalid(position, f"expected `,` or `]` after sample {count} of the list")


def read_dataset(path: str):
    """A local `datasets` dataset: a `save_to_disk` folder, or Parquet files."""
    import datasets

    if os.path.isdir(path):
        dataset = datasets.load_from_disk(path)
    elif path.endswith(".parquet"):
        dataset = datasets.load_dataset("parquet", data_files=path, split="train")
    else:
        raise DataError(f"{path}: expected a LLaVA .json/.jsonl file, a .parquet file or a `save_to_disk` folder")
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path} holds the splits {sorted(dataset)}, none called `train`")
        dataset = dataset["train"]
    return dataset


def row_id(row: dict, index: int) -> str:
    """A sample's name in messages: its `id`, else its place in the file."""
    return str(row.get("id", f"#{index}"))


def llava_conversation(row: dict, index: int, image_folder: str | None) -> Conversation:
    sid = row_id(row, index)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"sample {sid}: empty conversation")
    messages = []
    for turn in turns:
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in LLAVA_ROLES:
            raise DataError(f"sample {sid}: unknown `from` role {role!r} (LLaVA's are {', '.join(LLAVA_ROLES)})")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"sample {sid}: a {role} turn has no text `value`")
        messages.append({"role": LLAVA_ROLES[role], "content": turn["value"]})
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    videos = row.get("video") or []
    videos = [videos] if isinstance(videos, str) else list(videos)
    if videos and not images and not any(VIDEO in m["content"] for m in messages):
        # LLaVA-NeXT's video data (LLaVA-Video-178K) marks the clip with `<image>`
        messages = [{**m, "content": m["content"].replace(IMAGE, VIDEO)} for m in messages]
    return Conversation(sid, messages, [resolve(image, image_folder) for image in images],
                        [resolve(video, image_folder) for video in videos])


def chat_conversation(row: dict, index: int, image_folder: str | None) -> Conversation:
    sid = row_id(row, index)
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"sample {sid}: empty conversation")
    messages = []
    for message in raw:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise DataError(f"sample {sid}: unknown role {role!r} (the chat roles are {', '.join(sorted(CHAT_ROLES))})")
        content = message.get("content")
        if isinstance(content, list):  # parts: text and image, in order
            text = ""
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    text += IMAGE
                elif kind == "video":
                    text += VIDEO
                elif kind == "text":
                    text += part.get("text") or ""
                else:
                    raise DataError(f"sample {sid}: a message part of type {kind!r} (text, image and video are read)")
            content = text
        if not isinstance(content, str):
            raise DataError(f"sample {sid}: a {role} message without text content")
        messages.append({"role": role, "content": content})
    images = row.get("images") or []
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    videos = row.get("videos") or []
    videos = [videos] if isinstance(videos, str) else list(videos)
    if not all(isinstance(video, str) for video in videos):
        raise DataError(f"sample {sid}: its `videos` are not paths (a clip is a video file or a frames folder)")
    return Conversation(sid, messages, [resolve(image, image_folder) if isinstance(image, str) else image
                                        for image in images], [resolve(video, image_folder) for video in videos])


@dataclass
class CaptionPair:
    """An image and its caption: what BLIP-2's stage 1 and retrieval read from the `align` formats."""

    id: str
    image: object  # a path or a PIL image
    caption: str


def caption_pairs(conversations: list[Conversation]) -> list[CaptionPair]:
    """Each sample's one image and its caption (its assistant text, `<image>` markers and spaces around it stripped);
    a sample without exactly one image or without a caption is one line naming it."""
    pairs = []
    for conversation in conversations:
        sid = conversation.id
        if conversation.videos:
            raise DataError(f"sample {sid}: a clip ({VIDEO}); BLIP-2's stage 1 and retrieval read image-caption pairs")
        if len(conversation.images) != 1:
            raise DataError(f"sample {sid}: {len(conversation.images)} images; an image-caption pair has one")
        caption = " ".join(m["content"].replace(IMAGE, "").strip() for m in conversation.messages
                           if m["role"] == "assistant").strip()
        if not caption:
            raise DataError(f"sample {sid}: no caption (an assistant / gpt turn with text)")
        pairs.append(CaptionPair(sid, conversation.images[0], caption))
    return pairs


def resolve(path: str, image_folder: str | None) -> str:
    return path if os.path.isabs(path) or image_folder is None else os.path.join(image_folder, path)


def check(conversation: Conversation) -> None:
    """What can be checked without the images' pixels: turns, roles, markers against images."""
    sid, messages = conversation.id, conversation.messages
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"sample {sid}: no assistant (gpt) turn with text to learn from")
    if conversation.image_markers != len(conversation.images):
        raise DataError(f"sample {sid}: {conversation.image_markers} {IMAGE} marker(s) and {len(conversation.images)} "
                        "image(s)")
    if conversation.video_markers != len(conversation.videos):
        raise DataError(f"sample {sid}: {conversation.video_markers} {VIDEO} marker(s) and {len(conversation.videos)} "
                        "clip(s)")
    for marker in (IMAGE, VIDEO):
        if any(marker in m["content"] for m in messages if m["role"] == "assistant"):
            raise DataError(f"sample {sid}: an {marker} in an assistant turn (images and clips go in user turns)")


def image_size(image, sid: str) -> tuple[int, int]:
    """`(height, width)` of an image or image file, checking that the file is there and readable."""
    if not isinstance(image, str):
        return image.height, image.width
    if not os.path.isfile(image):
        raise DataError(f"sample {sid}: image file {image} is missing")
    try:
        with Image.open(image) as opened:
            opened.verify()
        with Image.open(image) as opened:
            return opened.height, opened.width
    except Exception as error:  # PIL raises many kinds for a broken file
        raise DataError(f"sample {sid}: image file {image} is not a readable image ({error})") from None


def clip_frames(clip: str, sid: str, num_frames: int) -> int:
    """A clip's frame count, checking that it opens (a video file PyAV reads, or a frames folder) and holds at least
    the `num_frames` the model samples: clips are never padded or repeated."""
    from vlm_fusion.processing_video import count_frames

    try:
        frames = count_frames(clip)
    except ValueError as error:
        raise DataError(f"sample {sid}: clip {clip}: {error}") from None
    if frames < num_frames:
        raise DataError(f"sample {sid}: clip {clip} has {frames} frames, fewer than the {num_frames} the model samples "
                        "(--num-frames)")
    return frames


def open_image(image) -> Image.Image:
    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
