import importlib.util
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_fusion  # noqa: F401  (registers the families)
from vlm_fusion.tools.tiny import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import `conversion_scripts/<name>.py` as a module (scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "conversion_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def family_parts(config_cls, vision="clip", text="llama", image_size=32, **config_kwargs):
    """A tiny config of `config_cls` and its processor, the image token added to the tokenizer."""
    tokenizer = tiny_tokenizer()
    probe = config_cls(vision_config=tiny_vision_config(vision, image_size=image_size),
                       text_config=tiny_text_config(text, vocab_size=len(tokenizer) + 1), **config_kwargs)
    from vlm_fusion import FAMILIES

    processor_cls = FAMILIES[config_cls.model_type][2]
    processor = processor_cls(image_processor=tiny_image_processor(image_size), tokenizer=tokenizer,
                              image_seq_length=probe.num_image_tokens())
    config = config_cls(vision_config=tiny_vision_config(vision, image_size=image_size),
                        text_config=tiny_text_config(text, vocab_size=len(tokenizer)),
                        image_token_id=processor.image_token_id, **config_kwargs)
    return config, processor
