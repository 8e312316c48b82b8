"""A synthetic visual-question task: 1-3 coloured shapes on a 3x3 grid, with captions and four kinds of question.

Everything is drawn from a seeded `numpy.random.Generator`, so a seed reproduces a data set exactly.
"""

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}
NUMBERS = ("zero", "one", "two", "three")
COLUMNS = ("left", "middle", "right")
IMAGE_SIZE = 96
GRID = 3
QUESTION_TYPES = ("colour", "shape", "count", "left_of")
PROMPT = "USER: <image>\n{question}\nASSISTANT:"  # what the demo models' chat template renders for a question
CAPTION_QUESTION = "describe the image ."
MAX_ANSWER_TOKENS = 16  # the longest answers: a three-shape caption, the reasoning of "left_of" (+ eos)


def cell_word(colour: str, shape: str, column: str) -> str:
    """The one token naming an occupied grid cell: 'red_circle_middle'."""
    return f"{colour}_{shape}_{column}"


CELL_WORDS = {cell_word(*parts): parts for parts in itertools.product(COLOURS, SHAPES, COLUMNS)}  # word -> its parts
VOCABULARY = (
    "USER ASSISTANT : ? . , a an and the is what which how many colour shape shapes object are there left of "
    "describe image yes no so empty " + " ".join(SHAPES + tuple(COLOURS) + NUMBERS + COLUMNS)
).split() + list(CELL_WORDS)


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    col: int
    radius: float
    cx: float
    cy: float


def sample_scene(rng: np.random.Generator) -> list[Item]:
    """1-3 shapes in distinct grid cells, with random size and jitter inside the cell."""
    cell = IMAGE_SIZE / GRID
    items = []
    for index in rng.choice(GRID * GRID, size=int(rng.integers(1, 4)), replace=False):
        row, col = divmod(int(index), GRID)
        radius = float(rng.uniform(0.28, 0.45) * cell)
        jitter = cell / 2 - radius
        items.append(Item(
            shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))], row=row, col=col,
            radius=radius, cx=(col + 0.5) * cell + float(rng.uniform(-jitter, jitter)),
            cy=(row + 0.5) * cell + float(rng.uniform(-jitter, jitter)),
        ))
    return items


def render(scene: list[Item]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for item in scene:
        x, y, r, fill = item.cx, item.cy, item.radius, COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif item.shape == "square":
            side = r * 0.85
            draw.rectangle([x - side, y - side, x + side, y + side], fill=fill)
        elif item.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:  # a five-pointed star
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            draw.polygon([(x + rr * np.cos(a), y - rr * np.sin(a)) for rr, a in zip(radii, angles)], fill=fill)
    return image


def caption(scene: list[Item]) -> str:
    """'a red circle and a blue square .', shapes column by column from the left, top to bottom within a column."""
    parts = [f"a {item.colour} {item.shape}" for item in sorted(scene, key=lambda item: (item.col, item.row))]
    return (" and ".join(parts) if len(parts) < 3 else f"{parts[0]} , {parts[1]} and {parts[2]}") + " ."


def cell_index(item: Item) -> int:
    """Grid cells are read row by row, the order of a vision tower's patches."""
    return item.row * GRID + item.col


def grid_text(scene: list[Item]) -> str:
    """The scene as text the way the demo's vision tower presents it: one word per grid cell, row by row, naming
    colour, shape and column ('empty red_circle_middle empty ...'). The language model is pretrained with this in
    place of the image. The column is spelled out because a rotary-position LM cannot tell a token's column
    (its position modulo 3) from row-major order."""
    words = ["empty"] * GRID**2
    for item in scene:
        words[cell_index(item)] = cell_word(item.colour, item.shape, COLUMNS[item.col])
    return " ".join(words)


def questions(scene: list[Item], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`(type, question, answer)` for every question type the scene allows an unambiguous answer to."""
    found = []
    unique_shapes = [i for i in scene if sum(j.shape == i.shape for j in scene) == 1]
    if unique_shapes:
        item = unique_shapes[rng.integers(len(unique_shapes))]
        found.append(("colour", f"what colour is the {item.shape} ?", item.colour))
    unique_colours = [i for i in scene if sum(j.colour == i.colour for j in scene) == 1]
    if unique_colours:
        item = unique_colours[rng.integers(len(unique_colours))]
        found.append(("shape", f"what shape is the {item.colour} object ?", item.shape))
    found.append(("count", "how many shapes are there ?", NUMBERS[len(scene)]))
    pairs = [(a, b) for a in unique_shapes for b in unique_shapes if a is not b and a.col != b.col]
    if pairs:
        a, b = pairs[rng.integers(len(pairs))]
        # the answer reasons before it concludes: each shape's column, then the comparison
        reasoning = f"the {a.shape} is {COLUMNS[a.col]} , the {b.shape} is {COLUMNS[b.col]} , so"
        verdict = "yes" if a.col < b.col else "no"
        found.append(("left_of", f"is the {a.shape} left of the {b.shape} ?", f"{reasoning} {verdict}"))
    return found


def examples(seed: int, count: int, *, kinds=QUESTION_TYPES, as_text: bool = False):
    """`count` examples `(image, kind, question, answer)`, the kinds in turn (balanced); kind "caption" describes.
    With `as_text`, the scene's `grid_text` stands in for the image (text-only data for the language model)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        kind = kinds[len(out) % len(kinds)]
        scene = sample_scene(rng)
        if kind == "caption":
            matching = [(kind, CAPTION_QUESTION, caption(scene))]
        else:
            matching = [q for q in questions(scene, rng) if q[0] == kind]
        if matching:  # otherwise draw another scene for this kind
            out.append((grid_text(scene) if as_text else render(scene), *matching[0]))
    return out
