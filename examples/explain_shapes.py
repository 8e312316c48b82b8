"""Where do the demo models look when they name a colour? `vlm_fusion.explain` on held-out shapes scenes.

For each colour question ("what colour is the star ?") of held-out scenes (seed 12345, as the demo's evaluation), the
map of the answer's first token (the colour word) is read at its peak patch cell. The demo's tower sees a 96 px scene
as 3 x 3 patches of 32 px, which are exactly the scene's grid cells, so the peak either is the asked shape's cell or
is not. Printed per family: how often it is, how often the peak is on any shape, and two chances: a random cell
(1 in 9) and a random one of the scene's shapes.

    python examples/explain_shapes.py --questions 200 --pictures docs/explain
"""

import argparse
import os

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_fusion  # noqa: F401
from vlm_fusion.demo import FAMILIES, checkpoint, shapes
from vlm_fusion.explain import explain
from vlm_fusion.explain.render import write

HELD_OUT_SEED = 12345


def colour_questions(count: int):
    """`count` held-out colour questions: (image, question, answer, the asked shape's (row, col), occupied cells)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    found = []
    while len(found) < count:
        scene = shapes.sample_scene(rng)
        asked = [q for q in shapes.questions(scene, rng) if q[0] == "colour"]
        if asked:
            _, question, answer = asked[0]
            item = next(i for i in scene if question == f"what colour is the {i.shape} ?")
            found.append((shapes.render(scene), question, answer, (item.row, item.col),
                          {(i.row, i.col) for i in scene}))
    return found


def measure(family: str, questions) -> dict:
    path = checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    in_cell = on_shape = right = 0
    per_layer = None
    for image, question, answer, cell, occupied in tqdm(questions, desc=family):
        result = explain(model, processor, [image], shapes.PROMPT.format(question=question),
                         max_new_tokens=shapes.MAX_ANSWER_TOKENS)
        peak = result.peak(0)
        if per_layer is None:
            per_layer = np.zeros(len(result.layers))
        for layer in range(len(result.layers)):
            heat = result.maps(layers=[layer])[0][0]
            per_layer[layer] += divmod(int(heat.flatten().argmax()), heat.shape[-1]) == cell
        in_cell += peak == cell
        on_shape += peak in occupied
        right += result.answer.replace("</s>", "").strip() == answer
    n = len(questions)
    return {"questions": n, "peak_in_cell": in_cell / n, "peak_on_a_shape": on_shape / n, "answers_right": right / n,
            "per_layer": {name: count / n for name, count in zip(result.layers, per_layer)}}


def side_by_side(answers, question: str, path: str) -> None:
    from PIL import Image, ImageDraw

    pictures = [(family, Image.open(grid)) for family, grid in answers]
    width = sum(p.width for _, p in pictures) + 12 * (len(pictures) - 1)
    figure = Image.new("RGB", (width, max(p.height for _, p in pictures) + 40), "white")
    draw, x = ImageDraw.Draw(figure), 0
    draw.text((4, 2), f"Q: {question}", fill="black")
    for family, picture in pictures:
        draw.text((x + 4, 22), f"{family}-style", fill="black")
        figure.paste(picture, (x, 40))
        x += picture.width + 12
    figure.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--pictures", help="also write each family's pictures and page for the first question here, "
                                           "and the three answers side by side (demo_colour_question.png)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    questions = colour_questions(args.questions)
    print("| family | colour questions | peak in the asked shape's cell | peak on any shape | answers right | "
          "peak in the cell, layer by layer |")
    print("|---|---:|---:|---:|---:|---|")
    answers = []
    for family in args.families.split(","):
        figures = measure(family, questions)
        layers = ", ".join(f"{name}: {share:.0%}" for name, share in figures["per_layer"].items())
        print(f"| {family} | {figures['questions']} | {figures['peak_in_cell']:.1%} | {figures['peak_on_a_shape']:.1%} "
              f"| {figures['answers_right']:.1%} | {layers} |")
        if args.pictures:
            image, question, *_ = questions[0]
            path = checkpoint(family)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            processor = AutoProcessor.from_pretrained(path)
            result = explain(model, processor, [image], shapes.PROMPT.format(question=question))
            answers.append((family, write(result, os.path.join(args.pictures, family))["grid"]))
    if answers:
        side_by_side(answers, questions[0][1], os.path.join(args.pictures, "demo_colour_question.png"))
    by_shapes = np.mean([1 / len(occupied) for *_, occupied in questions])
    print(f"chance: a random cell 11.1% (1 in 9); a random one of the scene's shapes {by_shapes:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
