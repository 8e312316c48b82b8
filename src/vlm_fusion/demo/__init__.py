"""The demo: a synthetic shapes task, tiny checkpoints of each family trained on it, and their evaluation."""

import importlib.resources

import vlm_fusion

MODELS = tuple(family.name for family in vlm_fusion.FAMILIES.values())  # one demo model per family, by its name


def checkpoint(family: str) -> str:
    """The folder of the demo checkpoint of `family` ("llava", "blip2" or "flamingo") in the installed package."""
    if family not in MODELS:
        raise ValueError(f"unknown demo model {family!r}; the demo models are {', '.join(MODELS)}")
    return str(importlib.resources.files("vlm_fusion.demo") / "checkpoints" / family)


def card_usage(family: str) -> dict:
    """The usage snippet of a demo model's card: loaded from the installed package, asked about a demo scene."""
    return {
        "load_from": f'vlm_fusion.demo.checkpoint("{family}")',
        "example_image": "import numpy as np\nfrom vlm_fusion.demo import shapes\n\n"
                         "image = shapes.render(shapes.sample_scene(np.random.default_rng(1)))  # a green square, a yellow star",
        "example_question": "what colour is the square ?",
    }
