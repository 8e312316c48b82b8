"""The model card `save_pretrained` and `push_to_hub` write: the family's template, `model_cards/<model_type>.md`
(Jinja2, YAML front matter from `huggingface_hub.ModelCardData`, shipped in the package as `vlm_fusion.model_cards`),
filled with what every model has and the fields its config declares (`model_card_fields`, `pipeline_tag`).

Not model code: `checkpoints.py` imports it by its absolute name and goes without it where exported remote code runs
without vlm-fusion installed.
"""

import importlib.resources
import json
import os

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from vlm_fusion.language_model import causal_lm_class

# The card's usage snippet: where the model loads from (a Python expression), the image, the question.
DEFAULT_USAGE = {"example_image": 'image = Image.new("RGB", (224, 224), "white")  # your image here',
                 "example_question": "What is shown in this image?"}


def _describe(config, name: str) -> str:
    return f"`{name}` ({config.hidden_size} wide, {config.num_hidden_layers} layers)"


def _count(modules) -> str:
    return f"{sum(p.numel() for m in modules for p in m.parameters()):,}"


def render_model_card(model, repo_id: str, *, tags=(), remote_code: bool = False, extra: str = "",
                      usage: dict | None = None) -> ModelCard:
    """The family's card; `usage` overrides `load_from` / `example_image` / `example_question` of its snippet."""
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=config.pipeline_tag,
        tags=list(dict.fromkeys(["vlm-fusion", config.model_type, config.pipeline_tag, *tags])),
        base_model=list(config.base_models) if config.base_models else None,
        license=config.license,
    )
    templates = importlib.resources.files("vlm_fusion.model_cards")
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: templates.joinpath(name).read_text()))
    content = environment.get_template(f"{config.model_type}.md").render(
        card_data=card_data.to_yaml(),
        model_name=repo_id.rstrip("/").split("/")[-1],
        repo_id=repo_id,
        vision_tower=_describe(config.vision_config, type(model.vision_tower).__name__),
        language_model=config.text_config and _describe(config.text_config,
                                                        causal_lm_class(config.text_config).__name__),
        visual_tokens=config.num_image_tokens(),
        bridge_parameters=_count(model.bridge_modules().values()),
        total_parameters=_count([model]),
        origin=config.origin or "Built from a configuration with randomly initialised weights.",
        remote_code=remote_code,
        headless=not model.can_generate(),
        **{"load_from": json.dumps(repo_id), **DEFAULT_USAGE, **(usage or {})},
        **config.model_card_fields(),
    )
    return ModelCard(content.rstrip() + ("\n\n" + extra.strip() + "\n" if extra else "\n"))


def write_model_card(model, save_directory, *, repo_id=None, tags=(), remote_code=False, extra: str = "",
                     usage: dict | None = None) -> None:
    """Write `README.md` into `save_directory`; `extra` markdown (an evaluation, say) is appended."""
    repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
    card = render_model_card(model, repo_id, tags=tags, remote_code=remote_code, extra=extra, usage=usage)
    card.save(os.path.join(save_directory, "README.md"))
