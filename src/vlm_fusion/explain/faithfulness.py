"""How faithful is a map? The pointing game and deletion / insertion AUC, per method, on any model and data.

For each item (an image, a prompt, the target region the answer is about), the model answers greedily once and each
method maps the answer's first token:

- pointing game: a hit when the centre of the map's peak cell lies in the target region. Chance: a random cell of
  the map (the share of cells whose centre is in the target), and, when the item lists the scene's objects, a random
  one of them (1 / objects).
- deletion / insertion AUC (Petsiuk, Das & Saenko, "RISE", BMVC 2018): the map's cells, most relevant first, are
  replaced one by one by the baseline (deletion: from the image; insertion: back into an image that is all
  baseline) and the token's probability read after each step; the AUC is the area under that curve over the share
  of cells replaced (trapezoids, 0 to 1). A faithful map makes deletion fall fast (low AUC) and insertion rise fast
  (high AUC). Chance: the mean AUC of `random_orders` random orders of the cells, on the same items.

The token's probability is read with the answer kept (teacher forcing), as occlusion reads it.
"""

from dataclasses import dataclass, field

import torch
from PIL import Image

from .occlusion import answer_log_odds, baseline_pixels, cell_masks
from .routes import ExplainError


@dataclass
class Item:
    image: Image.Image
    prompt: str  # as the processor takes it (the chat template applied)
    target: tuple[float, float, float, float]  # (left, top, right, bottom) in the image's pixels
    objects: list = field(default_factory=list)  # the scene's objects' regions, the target among them (optional)
    answer: str | None = None  # the expected answer (optional): its share of right answers is reported
    question: str | None = None


def peak_hits(heat: torch.Tensor, region, target) -> bool:
    """Is the centre of the peak cell of `heat` `(h, w)`, laid over `region` of the image, inside `target`?"""
    h, w = heat.shape
    row, col = divmod(int(heat.flatten().argmax()), w)
    return inside(cell_centre(row, col, h, w, region), target)


def cell_centre(row: int, col: int, h: int, w: int, region) -> tuple[float, float]:
    left, top, right, bottom = region
    return left + (col + 0.5) * (right - left) / w, top + (row + 0.5) * (bottom - top) / h


def inside(point, box) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def random_cell_chance(shape: tuple[int, int], region, target) -> float:
    """The chance that a random cell of an `h x w` map over `region` has its centre in `target`."""
    h, w = shape
    return sum(inside(cell_centre(r, c, h, w, region), target) for r in range(h) for c in range(w)) / (h * w)


def auc(curve: torch.Tensor) -> float:
    """Area under `curve` `(n + 1,)` sampled at 0, 1/n, ..., 1 (trapezoids)."""
    return float((curve[:-1] + curve[1:]).sum() / (2 * (len(curve) - 1)))


def deletion_insertion(model, inputs: dict, rows, token_ids, order: torch.Tensor, grid: tuple[int, int], *,
                       image: int = 0, token: int = 0, baseline: str = "mean", batch_size: int = 16):
    """(deletion AUC, insertion AUC, the two curves) of token `token` when image `image`'s cells leave (or come back)
    in `order` (cell indices, row by row, first removed first)."""
    pixel_values = inputs["pixel_values"]
    fill = baseline_pixels(pixel_values, baseline)
    cells = cell_masks(grid, pixel_values.shape[-2:]).to(pixel_values.device)[order]  # (n, Y, X) in order
    removed = torch.cat([torch.zeros_like(cells[:1]), cells.cumsum(0) > 0])  # (n + 1, Y, X): the first k cells
    variants = []
    for masks in (removed, ~removed):  # deletion: the first k replaced; insertion: all but the first k
        v = pixel_values[None].repeat(len(masks), *[1] * pixel_values.dim())  # (n + 1, N, C, Y, X)
        v[:, image] = torch.where(masks[:, None], fill[image], pixel_values[image])
        variants.append(v)
    probs = answer_log_odds(model, inputs, rows, token_ids, torch.cat(variants), batch_size)[:, token].sigmoid()
    deletion, insertion = probs[: len(removed)], probs[len(removed) :]
    return auc(deletion), auc(insertion), deletion, insertion


def evaluate(model, processor, items: list[Item], methods, *, baseline: str = "mean", random_orders: int = 3,
             batch_size: int = 16, progress=None) -> dict:
    """Per method: `pointing`, `deletion`, `insertion` (means over items), `seconds_per_token`; and `chance`: the
    pointing chances (`random_cell`, `random_object`) and the random orders' `deletion` and `insertion` AUC."""
    from . import explain  # the package's function (this module is imported by it)

    if not items:
        raise ExplainError("no items to evaluate")
    for index, item in enumerate(items):
        if item.target is None or len(item.target) != 4:
            raise ExplainError(f"item {index} has no target region (left, top, right, bottom): the pointing game "
                               "needs the region the answer is about")
    totals = {m: {"pointing": 0.0, "deletion": 0.0, "insertion": 0.0, "seconds": 0.0, "tokens": 0} for m in methods}
    chance = {"random_cell": 0.0, "random_object": 0.0, "deletion": 0.0, "insertion": 0.0}
    right = 0
    generator = torch.Generator().manual_seed(0)
    for item in progress(items, desc="evaluate") if progress else items:
        first = None
        for method in methods:
            result = explain(model, processor, [item.image], item.prompt, method=method,
                             token_ids=None if first is None else first.token_ids, baseline=baseline,
                             batch_size=batch_size, question=item.question)
            if first is None:
                first = result
                inputs, rows = teacher_forced(model, processor, item, result.token_ids)
            heat = result.maps()[0][0]  # the answer's first token
            order = heat.flatten().argsort(descending=True, stable=True)
            deletion, insertion, *_ = deletion_insertion(model, inputs, rows, result.token_ids, order,
                                                         tuple(heat.shape), baseline=baseline, batch_size=batch_size)
            scores = totals[method]
            scores["pointing"] += peak_hits(heat, result.regions[0], item.target)
            scores["deletion"] += deletion
            scores["insertion"] += insertion
            scores["seconds"] += result.seconds
            scores["tokens"] += len(result.tokens)
        shape = tuple(heat.shape)
        chance["random_cell"] += random_cell_chance(shape, first.regions[0], item.target)
        chance["random_object"] += 1 / len(item.objects) if item.objects else float("nan")
        for _ in range(random_orders):
            order = torch.randperm(shape[0] * shape[1], generator=generator)
            deletion, insertion, *_ = deletion_insertion(model, inputs, rows, first.token_ids, order, shape,
                                                         baseline=baseline, batch_size=batch_size)
            chance["deletion"] += deletion / random_orders
            chance["insertion"] += insertion / random_orders
        if item.answer is not None:
            right += processor.decode(first.token_ids, skip_special_tokens=True).strip() == item.answer
    n = len(items)
    report = {m: {"pointing": s["pointing"] / n, "deletion": s["deletion"] / n, "insertion": s["insertion"] / n,
                  "seconds_per_token": s["seconds"] / s["tokens"]} for m, s in totals.items()}
    report["chance"] = {k: v / n for k, v in chance.items()}
    report["items"] = n
    report["answers_right"] = right / n if all(item.answer is not None for item in items) else None
    return report


def teacher_forced(model, processor, item: Item, token_ids):
    """The processor's inputs for `item` with the answer appended, and the rows that predict the answer's tokens."""
    inputs = processor(images=[item.image.convert("RGB")], text=[item.prompt], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    length = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"][0], torch.tensor(token_ids, device=device)])[None]
    rows = torch.arange(length - 1, length - 1 + len(token_ids), device=device)
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, rows


def shapes_items(seed: int, count: int, *, min_shapes: int = 2) -> list[Item]:
    """`count` colour questions of the demo's shapes task, from scenes of `min_shapes` or more shapes drawn with
    `seed`: the target is the asked shape's grid cell, the objects every shape's cell."""
    import numpy as np

    from ..demo import shapes

    rng = np.random.default_rng(seed)
    cell = shapes.IMAGE_SIZE / shapes.GRID
    box = lambda item: (item.col * cell, item.row * cell, (item.col + 1) * cell, (item.row + 1) * cell)  # noqa: E731
    items = []
    while len(items) < count:
        scene = shapes.sample_scene(rng)
        asked = [q for q in shapes.questions(scene, rng) if q[0] == "colour"]
        if len(scene) < min_shapes or not asked:
            continue
        _, question, answer = asked[0]
        shape = next(i for i in scene if question == f"what colour is the {i.shape} ?")
        items.append(Item(image=shapes.render(scene), prompt=shapes.PROMPT.format(question=question), target=box(shape),
                          objects=[box(i) for i in scene], answer=answer, question=question))
    return items

