"""Model cards for saved and pushed models (not model code: exported remote code never imports this).

The templates are `model_cards/<model_type>.md` (Jinja2, YAML front matter from `huggingface_hub.ModelCardData`),
shipped in the package as `vlm_fusion.model_cards`.
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


def llava_video_text(config) -> str | None:
    """One sentence on how a LLaVA-style model reads clips, or `None` without a video path."""
    if config.video_token_id is None:
        return None
    per_frame, per_clip = config.video_token_counts()
    how = {None: "every patch of each frame is projected",
           "average": f"each frame's patch features are average-pooled ({config.video_pool_stride} x "
                      f"{config.video_pool_stride}) before the projector, as LLaVA-NeXT-Video does",
           "max": f"each frame's patch features are max-pooled ({config.video_pool_stride} x "
                  f"{config.video_pool_stride}) before the projector, as LLaVA-NeXT-Video does",
           "bilinear": f"each frame's projected tokens are bilinearly resized down {config.video_pool_stride}x, as "
                       "LLaVA-OneVision does"}[config.video_pooling]
    newline = ", then a learned newline after the clip" if per_clip else ""
    return f"Clips are read frame by frame: {how} ({per_frame} tokens a frame{newline})."


def family_fields(model) -> dict:
    """What each family's template shows of its bridge."""
    config = model.config
    if config.model_type == "fusion_llava":
        projector = "2-layer GELU MLP" if config.projector_type == "mlp2x_gelu" else "linear"
        anyres = config.image_grid_pinpoints and ", ".join(f"{h}x{w}" for h, w in config.image_grid_pinpoints)
        if config.anyres_max_tiles is not None:
            anyres = f"{anyres}; a grid above {config.anyres_max_tiles} tiles' features resized down, as OneVision's"
        return dict(projector=projector, vision_feature_layer=config.vision_feature_layer,
                    strategy=config.vision_feature_select_strategy, anyres=anyres, video=llava_video_text(config))
    if config.model_type == "fusion_blip2_qformer":
        return dict(num_query_tokens=config.num_query_tokens, qformer_layers=config.qformer_num_hidden_layers,
                    qformer_width=config.qformer_hidden_size, cross_attention_frequency=config.cross_attention_frequency,
                    embed_dim=config.embed_dim, max_text_length=config.max_text_length)
    if config.model_type == "fusion_blip2":
        return dict(num_query_tokens=config.num_query_tokens, qformer_layers=config.qformer_num_hidden_layers,
                    qformer_width=config.qformer_hidden_size, cross_attention_frequency=config.cross_attention_frequency,
                    instruction_aware=config.qformer_text_input)
    return dict(num_latents=config.num_latents, perceiver_depth=config.perceiver_depth,
                gated_layers=", ".join(map(str, config.gated_layer_indices())),
                idefics=config.cross_attention_style == "idefics", gate_shape=config.gate_shape)


def pipeline_tag(config) -> str:
    return "zero-shot-image-classification" if config.model_type == "fusion_blip2_qformer" else "image-text-to-text"


def render_model_card(model, repo_id: str, *, tags=(), remote_code: bool = False, extra: str = "",
                      usage: dict | None = None) -> ModelCard:
    """The family's card; `usage` overrides `load_from` / `example_image` / `example_question` of its snippet."""
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag(config),
        tags=list(dict.fromkeys(["vlm-fusion", config.model_type, pipeline_tag(config), *tags])),
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
        **family_fields(model),
    )
    return ModelCard(content.rstrip() + ("\n\n" + extra.strip() + "\n" if extra else "\n"))


def write_model_card(model, save_directory, *, repo_id=None, tags=(), remote_code=False, extra: str = "",
                     usage: dict | None = None) -> None:
    """Write `README.md` into `save_directory`; `extra` markdown (an evaluation, say) is appended."""
    repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
    card = render_model_card(model, repo_id, tags=tags, remote_code=remote_code, extra=extra, usage=usage)
    card.save(os.path.join(save_directory, "README.md"))
