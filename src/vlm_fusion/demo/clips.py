"""The shapes task over time: short clips (8 frames, 96 px) in which shapes move between grid cells, appear, or blink,
and questions that no single frame answers.

A clip is the shapes scene of `shapes` with, for each shape, where it is in every frame (`Track.cells`: a grid cell
or `None` while it is not shown). One event makes each clip's question:

* `direction`: one shape moves one cell (left, right, up or down) between two frames; "which way does the red
  circle move ?" -> "right";
* `appears_last`: the shapes come into view one after another; "which shape appears last ?" -> "star";
* `blinks`: one shape disappears for a frame one to three times; "how many times does the square blink ?" -> "two".

Everything is drawn from a seeded `numpy.random.Generator`, so a seed reproduces a clip and its question exactly.
"""

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from . import shapes

NUM_FRAMES = 8
TEMPORAL_TYPES = ("direction", "appears_last", "blinks")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (rows, columns) per step
PROMPT = "USER: <video>\n{question}\nASSISTANT:"  # a clip's question as the demo models' chat template renders it
VOCABULARY = "<video> way does move up down appears last times blink".split()  # words beyond `shapes.VOCABULARY`


@dataclass(frozen=True)
class Track:
    """One shape over the clip: its look (`item`, whose row/col/centre are those of its first shown cell) and the grid
    cell `(row, col)` it is drawn in, frame by frame (`None`: not shown)."""

    item: shapes.Item
    cells: tuple


def frame_items(clip: list[Track], frame: int) -> list[shapes.Item]:
    """The shapes drawn in one frame, each moved to that frame's cell with its jitter inside the cell kept."""
    size = shapes.IMAGE_SIZE / shapes.GRID
    out = []
    for track in clip:
        cell = track.cells[frame]
        if cell is not None:
            row, col = cell
            item = track.item
            out.append(replace(item, row=row, col=col, cx=item.cx + (col - item.col) * size,
                               cy=item.cy + (row - item.row) * size))
    return out


def render_clip(clip: list[Track], num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """The clip's frames as PIL images: its `NUM_FRAMES` states, each held `num_frames / NUM_FRAMES` frames (a slower
    recording of the same events; sampling `NUM_FRAMES` of them uniformly gives the states back)."""
    if num_frames % NUM_FRAMES:
        raise ValueError(f"num_frames must be a multiple of {NUM_FRAMES} (each state held as long), got {num_frames}")
    states = [shapes.render(frame_items(clip, frame)) for frame in range(NUM_FRAMES)]
    return [state for state in states for _ in range(num_frames // NUM_FRAMES)]


def clip_text(clip: list[Track]) -> str:
    """The clip as text, the way the LLaVA-style demo model's LM reads its frames: each frame's `shapes.grid_text`
    (a word per grid cell, row by row), frame after frame."""
    return " ".join(shapes.grid_text(frame_items(clip, frame)) for frame in range(NUM_FRAMES))


def as_array(frames: list[Image.Image]) -> np.ndarray:
    """A clip's frames as the `(frames, height, width, channels)` uint8 array a processor's `videos=` takes."""
    return np.stack([np.asarray(frame) for frame in frames])


def _unique(scene, item, field) -> bool:
    return sum(getattr(other, field) == getattr(item, field) for other in scene) == 1


def _still(item) -> Track:
    return Track(item, ((item.row, item.col),) * NUM_FRAMES)


def _direction(scene, rng):
    """One shape (unique in colour and shape, so the question names it) moves one cell into a free one."""
    free = {(r, c) for r in range(shapes.GRID) for c in range(shapes.GRID)} - {(i.row, i.col) for i in scene}
    options = [(item, name, (item.row + dr, item.col + dc)) for item in scene
               if _unique(scene, item, "shape") and _unique(scene, item, "colour")
               for name, (dr, dc) in DIRECTIONS.items() if (item.row + dr, item.col + dc) in free]
    if not options:
        return None
    item, name, target = options[rng.integers(len(options))]
    moves_at = int(rng.integers(2, NUM_FRAMES - 1))  # frames before: the old cell; from it on: the new one
    cells = ((item.row, item.col),) * moves_at + (target,) * (NUM_FRAMES - moves_at)
    clip = [Track(item, cells) if other is item else _still(other) for other in scene]
    return clip, f"which way does the {item.colour} {item.shape} move ?", name


def _appears_last(scene, rng):
    """Two or three shapes of distinct kinds come into view at distinct frames (the first from frame 0 or later)."""
    if len(scene) < 2 or len({item.shape for item in scene}) < len(scene):
        return None
    starts = sorted(int(s) for s in rng.choice(np.arange(0, NUM_FRAMES - 1), size=len(scene), replace=False))
    order = rng.permutation(len(scene))
    clip = []
    for item, start in zip([scene[i] for i in order], starts):
        clip.append(Track(item, (None,) * start + ((item.row, item.col),) * (NUM_FRAMES - start)))
    return clip, "which shape appears last ?", clip[-1].item.shape


def _blinks(scene, rng):
    """One shape (unique in its kind) is hidden for single frames 1-3 times; shown in the first and last frames."""
    unique = [item for item in scene if _unique(scene, item, "shape")]
    if not unique:
        return None
    item = unique[rng.integers(len(unique))]
    count = int(rng.integers(1, 4))
    # hidden frames among 1..6, no two adjacent (so each one is a blink of its own): choose from a smaller range and
    # spread them, the standard bijection between k-subsets with gaps and plain k-subsets
    picked = sorted(int(x) for x in rng.choice(np.arange(NUM_FRAMES - 2 - (count - 1)), size=count, replace=False))
    hidden = {1 + x + i for i, x in enumerate(picked)}
    cells = tuple(None if frame in hidden else (item.row, item.col) for frame in range(NUM_FRAMES))
    clip = [Track(item, cells) if other is item else _still(other) for other in scene]
    return clip, f"how many times does the {item.shape} blink ?", shapes.NUMBERS[count]


EVENTS = {"direction": _direction, "appears_last": _appears_last, "blinks": _blinks}


def sample_clip(rng: np.random.Generator, kind: str) -> tuple[list[Track], str, str]:
    """A clip made for a question of `kind` (one of `TEMPORAL_TYPES`): `(clip, question, answer)`; scenes that
    cannot carry the event are drawn again."""
    if kind not in EVENTS:
        raise ValueError(f"unknown temporal question type {kind!r}; the types are {', '.join(TEMPORAL_TYPES)}")
    while True:
        made = EVENTS[kind](shapes.sample_scene(rng), rng)
        if made is not None:
            return made


def examples(seed: int, count: int, *, kinds=TEMPORAL_TYPES, num_frames: int = NUM_FRAMES,
             as_text: bool = False) -> list[tuple[list[Image.Image] | str, str, str, str]]:
    """`count` examples `(frames, kind, question, answer)`, the kinds in turn (balanced); `num_frames` frames a clip
    (`render_clip`: the same clips and questions whatever the count). With `as_text`, the clip's `clip_text` stands
    in for its frames (the same clips and questions)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        clip, question, answer = sample_clip(rng, kind)
        out.append((clip_text(clip) if as_text else render_clip(clip, num_frames), kind, question, answer))
    return out
