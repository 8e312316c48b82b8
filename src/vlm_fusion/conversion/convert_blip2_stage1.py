"""BLIP-2's stage 1 -> `FusionBlip2ForImageTextRetrieval` (the Q-Former with its ITC, ITM and ITG heads, no LM), run as
`vlm-fusion convert blip2 --source hf-retrieval | lavis-stage1` (see `convert_blip2` for the commands).

`--source hf-retrieval` converts transformers' Blip2ForImageTextRetrieval (Salesforce/blip2-itm-vit-g), which has no
ITG head and no temperature: `text_head`'s dense and norm are newly initialised (its decoder is tied to the word
embeddings anyway) and the temperature is the config's default, 0.07. `--source lavis-stage1` converts LAVIS's
stage-1 file (blip2_pretrained.pth, Blip2Qformer) with all it trains. The verification compares ITC cosines and ITM
logits with transformers' Blip2ForImageTextRetrieval (for LAVIS, holding the file's tensors), the ITG head with
transformers' BERT head, the temperature with the file's, and says what it could not check.
"""

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerConfig, FusionBlip2QFormerProcessor
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.blip2_common import (
    EVA_RULES,
    LAVIS_LN_VISION_EPS,
    lavis_qformer_config,
    merge_eva_qkv_bias,
    qformer_fields,
    share_vision_norm,
    with_backbone,
)
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.modeling_qformer import qformer_rules
from vlm_fusion.vision import load_vision_tower, select_image_features

TEXTS = ["a photo of a red circle", "two blue squares on a white table"]  # the captions the verification scores


def hf_retrieval_rules() -> list[tuple[str, str | None]]:
    """transformers' Blip2ForImageTextRetrieval: the tower, the queries, the text embeddings (outside `qformer` and
    without a LayerNorm of their own: `qformer.layernorm` norms queries and text alike, as ours), the Q-Former with its
    text feed-forward, the ITC projections and the ITM head."""
    return [
        (r"^query_tokens$", "qformer.query_tokens"),
        (r"^vision_model\.", "vision_tower."),
        (r"^embeddings\.word_embeddings\.", "qformer.word_embeddings."),
        (r"^embeddings\.position_embeddings\.", "qformer.position_embeddings."),
        (r"^embeddings\.position_ids$", None),  # the buffer 0, 1, 2, ... (older saves kept it): ours counts positions
        (r"^qformer\.layernorm\.", "qformer.layernorm."),
        *qformer_rules(r"qformer\.encoder\.layer\.", text=True),
        (r"^vision_projection\.", "vision_projection."),
        (r"^text_projection\.", "text_projection."),
        (r"^itm_head\.", "itm_head."),
    ]


def lavis_stage1_rules() -> list[tuple[str, str | None]]:
    """LAVIS's `Blip2Qformer` (`blip2_pretrained.pth`): everything of `lavis_rules`' Q-Former plus its text branch,
    the ITG head (`Qformer.cls`), the ITC projections, the ITM head and the temperature; the EVA tower if saved."""
    return [
        (r"^query_tokens$", "qformer.query_tokens"),
        (r"^ln_vision\.", "vision_layernorm."),
        *EVA_RULES,
        (r"^Qformer\.bert\.embeddings\.word_embeddings\.", "qformer.word_embeddings."),
        (r"^Qformer\.bert\.embeddings\.position_embeddings\.", "qformer.position_embeddings."),
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
        (r"^Qformer\.bert\.embeddings\.position_ids$", None),  # the buffer 0, 1, 2, ...: ours counts positions
        *qformer_rules(r"Qformer\.bert\.encoder\.layer\.", text=True),
        (r"^Qformer\.cls\.predictions\.transform\.dense\.", "text_head.dense."),
        (r"^Qformer\.cls\.predictions\.transform\.LayerNorm\.", "text_head.norm."),
        (r"^Qformer\.cls\.predictions\.bias$", "text_head.decoder.bias"),
        # the decoder is the word embeddings and `predictions.bias` (tied in BERT; `check_tied_decoder` proves it)
        (r"^Qformer\.cls\.predictions\.decoder\.(?:weight|bias)$", None),
        (r"^vision_proj\.", "vision_projection."),
        (r"^text_proj\.", "text_projection."),
        (r"^itm_head\.", "itm_head."),
        (r"^temp$", "temperature"),
    ]


# transformers' names for LAVIS's stage-1 tensors, as transformers' own BLIP-2 conversion script renames them: what
# the verification loads into transformers' Blip2ForImageTextRetrieval.
LAVIS_TO_TRANSFORMERS_RULES = [
    (r"^query_tokens$", "query_tokens"),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^Qformer\.bert\.embeddings\.position_ids$", None),  # a buffer
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^Qformer\.cls\.", None),  # transformers' model has no ITG head (checked on its own)
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^itm_head\.", "itm_head."),
    (r"^(?:temp$|ln_vision\.|visual_encoder\.)", None),  # transformers returns bare cosines; the image side is given
]

# Tensors without which a LAVIS file is not a stage-1 checkpoint (blip2_opt / blip2_t5 drop the Q-Former's text side).
LAVIS_STAGE1_KEYS = ("query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.word_embeddings.weight",
                     "Qformer.cls.predictions.bias", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
                     "temp")

# The Q-Former has no token-type embeddings: its tokenizer does not emit `token_type_ids` (BERT's does).
QFORMER_INPUT_NAMES = ["input_ids", "attention_mask"]


def qformer_tokenizer(path: str, *, vocab_size: int, placeholders=()):
    """
    The Q-Former's BERT tokenizer from `path`, made to fit a vocabulary of `vocab_size`: `placeholders` whose ids lie
    past it are removed (transformers' `Blip2Processor` adds `<image>` after the Q-Former's vocabulary; its model strips
    those tokens before the Q-Former reads the text, and our processor never writes them); `[DEC]` is added as BLIP-2
    adds it (`bos_token`) when missing; no `token_type_ids`. Raises unless the result has exactly `vocab_size` tokens.
    """
    import json
    import tempfile

    from vlm_fusion.processing_qformer import DEC_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    drop = {token for token in placeholders if vocab.get(token, -1) >= vocab_size}
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's own files, less `drop`, loaded again
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/tokenizer.json") as file:
            backend = json.load(file)
        backend["added_tokens"] = [token for token in backend["added_tokens"] if token["content"] not in drop]
        with open(f"{tmp}/tokenizer.json", "w") as file:
            json.dump(backend, file)
        with open(f"{tmp}/tokenizer_config.json") as file:
            settings = json.load(file)
        if "added_tokens_decoder" in settings:  # (an empty one written where there was none re-orders the specials)
            settings["added_tokens_decoder"] = {i: token for i, token in settings["added_tokens_decoder"].items()
                                                if token["content"] not in drop}
        dropped = lambda v: (v.get("content") if isinstance(v, dict) else v) in drop  # noqa: E731  (str or AddedToken)
        for key, value in list(settings.items()):
            if key == "added_tokens_decoder":
                continue
            if isinstance(value, (str, dict)) and dropped(value):  # `image_token`
                del settings[key]
            elif isinstance(value, list):  # `additional_special_tokens`, `extra_special_tokens`
                settings[key] = [v for v in value if not dropped(v)]
            elif isinstance(value, dict):  # `extra_special_tokens` as a mapping
                settings[key] = {k: v for k, v in value.items() if not dropped(v)}
        with open(f"{tmp}/tokenizer_config.json", "w") as file:
            json.dump(settings, file)
        tokenizer = AutoTokenizer.from_pretrained(tmp, model_input_names=QFORMER_INPUT_NAMES)
    kept = {token: i for token, i in vocab.items() if token not in drop}
    if tokenizer.get_vocab() != kept:
        raise ConversionError(f"Removing {sorted(drop)} from the tokenizer of {path} changed other tokens' ids.")
    if drop:
        print(f"[tokenizer] removed {sorted(drop)}: transformers' Blip2Processor placeholder, past the Q-Former's "
              f"vocabulary ({vocab_size}); our processor does not write it")
    if DEC_TOKEN not in kept:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        print(f"[tokenizer] added {DEC_TOKEN} as its bos token (id {tokenizer.convert_tokens_to_ids(DEC_TOKEN)}), as "
              "BLIP-2 does")
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"The Q-Former's tokenizer ({path}) has {len(tokenizer)} tokens with {DEC_TOKEN}, its "
                              f"vocabulary {vocab_size} rows: they are not the same vocabulary.")
    return tokenizer


def stage1_config(vision_config, qformer, *, num_query_tokens: int, embed_dim: int, vision_layer_norm_eps: float,
                  bos_token_id: int, origin: str, **fields) -> FusionBlip2QFormerConfig:
    return FusionBlip2QFormerConfig(
        vision_config=vision_config,
        num_query_tokens=num_query_tokens,
        vision_layer_norm_eps=vision_layer_norm_eps,
        embed_dim=embed_dim,
        qformer_bos_token_id=bos_token_id,
        origin=origin,
        **qformer_fields(qformer, text=True),
        **fields,
    )


def new_text_head(config: FusionBlip2QFormerConfig, initializer_range: float, seed: int = 0) -> dict:
    """ITG's head for a source without one: BERT's initialisation (dense weight N(0, `initializer_range`) drawn from
    `seed`, zero biases, unit LayerNorm); its decoder weight is the word embeddings (tied), its bias starts at 0."""
    generator = torch.Generator().manual_seed(seed)
    D, vocab = config.qformer_hidden_size, config.qformer_vocab_size
    return {"text_head.dense.weight": torch.randn(D, D, generator=generator) * initializer_range,
            "text_head.dense.bias": torch.zeros(D), "text_head.norm.weight": torch.ones(D),
            "text_head.norm.bias": torch.zeros(D), "text_head.decoder.bias": torch.zeros(vocab)}


def check_tied_decoder(source: dict) -> None:
    """LAVIS's ITG decoder must be BERT's tied one (weight = word embeddings, bias = `predictions.bias`): ours is."""
    prefix = "Qformer.cls.predictions."
    pairs = ((prefix + "decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
             (prefix + "decoder.bias", prefix + "bias"))
    for key, tied_to in pairs:
        if key in source and not torch.equal(source[key], source[tied_to]):
            raise ConversionError(f"`{key}` is not `{tied_to}`: the ITG decoder is not tied as in BERT (our "
                                  "`text_head` decoder is the Q-Former's word embeddings).")


def convert_hf_retrieval(args):
    """transformers' Blip2ForImageTextRetrieval (Salesforce/blip2-itm-vit-g and friends)."""
    from transformers import Blip2ForImageTextRetrieval

    source = AutoConfig.from_pretrained(args.input)
    if source.model_type != "blip-2":
        raise ConversionError(f"--source hf-retrieval expects a `blip-2` config (Blip2ForImageTextRetrieval), "
                              f"{args.input} holds {source.model_type!r}.")
    architectures = source.architectures or []
    if architectures and "Blip2ForImageTextRetrieval" not in architectures:
        raise ConversionError(f"--source hf-retrieval converts Blip2ForImageTextRetrieval, {args.input} holds "
                              f"{architectures} (generation checkpoints convert with --source hf).")
    qformer = source.qformer_config
    if not qformer.use_qformer_text_input:
        raise ConversionError(f"{args.input}'s Q-Former reads no text (`use_qformer_text_input` is false): it is not "
                              "an image-text retrieval checkpoint.")
    source_processor = AutoProcessor.from_pretrained(args.input)
    placeholder = getattr(source_processor, "image_token", None)
    tokenizer = qformer_tokenizer(args.input, vocab_size=qformer.vocab_size,
                                  placeholders=[str(placeholder)] if placeholder is not None else [])
    processor = FusionBlip2QFormerProcessor(image_processor=source_processor.image_processor, tokenizer=tokenizer)
    config = stage1_config(
        source.vision_config, qformer, num_query_tokens=source.num_query_tokens,
        embed_dim=source.image_text_hidden_size, bos_token_id=processor.bos_token_id,
        vision_layer_norm_eps=source.vision_config.layer_norm_eps,  # its post_layernorm
        origin="Converted from transformers' Blip2ForImageTextRetrieval (its ITG head and temperature are new).")
    state_dict = rename_keys(read_state_dict(args.input), hf_retrieval_rules())
    for name in ("weight", "bias"):  # transformers norms inside the tower; our bridge norms the selected layer
        state_dict[f"vision_layernorm.{name}"] = state_dict[f"vision_tower.post_layernorm.{name}"].clone()
    # transformers' model has no ITG head and no temperature (it scores bare cosines)
    state_dict.update(new_text_head(config, qformer.initializer_range))
    state_dict["temperature"] = torch.full((1,), float(config.temperature))
    print("[new] transformers' Blip2ForImageTextRetrieval has no ITG head and no temperature: `text_head` dense and "
          "norm are newly initialised (BERT's init), its decoder tied to the word embeddings (bias 0); temperature = "
          f"{config.temperature} (the config's default). ITC and ITM are converted; ITG needs training.")

    def verify(path):
        model = FusionBlip2ForImageTextRetrieval.from_pretrained(path, dtype=args.dtype).eval()
        inputs = FusionBlip2QFormerProcessor.from_pretrained(path)(images=sample_image(), text=TEXTS,
                                                                   return_tensors="pt")
        reference = Blip2ForImageTextRetrieval.from_pretrained(args.input, dtype=args.dtype).eval()
        source_inputs = source_processor(images=sample_image(), text=TEXTS, padding="longest", return_tensors="pt")
        text_start = source.num_query_tokens if source.image_token_index is not None else 0  # `<image>` x N_q first
        for key in ("input_ids", "attention_mask"):
            if not torch.equal(source_inputs[key][:, text_start:], inputs[key]):
                raise ConversionError(f"The converted processor gives the sample captions other `{key}` than the "
                                      "source.")
        if not torch.equal(source_inputs["pixel_values"], inputs["pixel_values"]):
            raise ConversionError("The converted processor gives the sample image other `pixel_values` than the "
                                  "source.")
        itc = model(**inputs)
        compare_logits("ITC cosine (ours: logits_per_image * temperature)",
                       itc.logits_per_image * model.clamped_temperature, reference(**source_inputs).logits_per_image,
                       args.atol)
        pairs = {**source_inputs, "pixel_values": source_inputs["pixel_values"].expand(len(TEXTS), -1, -1, -1)}
        compare_logits("ITM logits", model(**inputs, use_image_text_matching_head=True).logits_per_image,
                       reference(**pairs, use_image_text_matching_head=True).logits_per_image, args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionBlip2ForImageTextRetrieval,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


def clamped_temperature(temp: float) -> float:
    """The file's temperature as vlm-fusion's model uses it, clamped to `TEMPERATURE_RANGE` ([0.001, 0.5]:
    `FusionBlip2ForImageTextRetrieval.clamped_temperature`, as BLIP and LAVIS's BLIP clamp theirs), and said when the
    clamp changes it: LAVIS's `Blip2Qformer` divides by `temp` as it is. The weight keeps the file's value; the config's
    `temperature` (the initial value, validated in that range) holds the clamped one."""
    from vlm_fusion.modeling_qformer import TEMPERATURE_RANGE

    low, high = TEMPERATURE_RANGE
    used = min(max(temp, low), high)
    if used != temp:
        print(f"[temperature] the file's `temp` {temp:.6g} is outside [{low}, {high}]: the weight keeps it, but "
              f"vlm-fusion's ITC divides by it clamped to {used:.6g} (FusionBlip2ForImageTextRetrieval."
              f"clamped_temperature), where LAVIS's Blip2Qformer, which does not clamp, divides by {temp:.6g}: our "
              f"ITC logits are {temp / used:.3g}x LAVIS's")
    return used


def convert_lavis_stage1(args):
    """LAVIS's BLIP-2 stage-1 checkpoint (`Blip2Qformer`, `blip2_pretrained.pth`)."""
    if not (args.vision_tower and args.qformer_tokenizer):
        raise ConversionError("--source lavis-stage1 needs --vision-tower DIR and --qformer-tokenizer DIR.")
    source = read_state_dict(args.input)
    missing = [key for key in LAVIS_STAGE1_KEYS if key not in source]
    if missing:
        hint = (" (a blip2_opt / blip2_t5 file: convert it with --source lavis)"
                if any(k.startswith(("opt_proj", "t5_proj")) for k in source) else "")
        raise ConversionError(f"{args.input} is not a LAVIS stage-1 (Blip2Qformer) checkpoint: it lacks "
                              f"{conversion.preview(missing)}{hint}.")
    check_tied_decoder(source)
    vision_config = AutoConfig.from_pretrained(args.vision_tower)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    key = source.get("Qformer.bert.encoder.layer.0.crossattention.self.key.weight")
    if key is None:
        raise ConversionError(f"{args.input}'s Q-Former has no cross-attention in layer 0.")
    width = key.shape[1]
    if width != vision_config.hidden_size:
        raise ConversionError(f"The Q-Former cross-attends to {width}-wide features, the tower in {args.vision_tower} "
                              f"is {vision_config.hidden_size} wide.")
    tower_in_file = any(k.startswith("visual_encoder.") for k in source)
    if tower_in_file and vision_config.model_type != "blip_2_vision_model":
        raise ConversionError(f"{args.input} holds an EVA tower (`visual_encoder.*`): --vision-tower must be a "
                              f"Blip2VisionModel directory, not {vision_config.model_type!r}.")
    vocab_size = source["Qformer.bert.embeddings.word_embeddings.weight"].shape[0]
    tokenizer = qformer_tokenizer(args.qformer_tokenizer, vocab_size=vocab_size)
    qformer = lavis_qformer_config(
        source, args, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=source["Qformer.bert.embeddings.position_embeddings.weight"].shape[0])
    processor = FusionBlip2QFormerProcessor(image_processor=AutoImageProcessor.from_pretrained(args.vision_tower),
                                            tokenizer=tokenizer)
    config = stage1_config(
        vision_config, qformer, num_query_tokens=source["query_tokens"].shape[1],
        embed_dim=source["vision_proj.weight"].shape[0], vision_layer_norm_eps=LAVIS_LN_VISION_EPS,
        bos_token_id=processor.bos_token_id, origin="Converted from a LAVIS BLIP-2 stage-1 checkpoint (Blip2Qformer).",
        temperature=clamped_temperature(source["temp"].item()))
    state_dict = merge_eva_qkv_bias(rename_keys(source, lavis_stage1_rules()))
    state_dict["temperature"] = state_dict["temperature"].reshape(1)  # LAVIS's is a scalar, ours (1,)
    if tower_in_file:  # EVA has no final norm; transformers' conversion gives `post_layernorm` LAVIS's `ln_vision`
        state_dict = share_vision_norm(state_dict)
    tower = load_vision_tower(args.vision_tower)
    state_dict = with_backbone(state_dict, "vision_tower", tower.state_dict(), args)
    del tower

    def verify(path):
        verify_lavis_stage1(path, args, source, config, tower_in_file)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionBlip2ForImageTextRetrieval,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


class _GivenImageEmbeds(torch.nn.Module):
    """In place of transformers' vision model: returns the image embeddings its Q-Former is to read."""

    def __init__(self, image_embeds):
        super().__init__()
        self.image_embeds = image_embeds

    def forward(self, pixel_values=None, **kwargs):
        return (self.image_embeds,)


def transformers_retrieval_reference(source: dict, config: FusionBlip2QFormerConfig):
    """transformers' Blip2ForImageTextRetrieval holding LAVIS's stage-1 tensors under transformers' names (its vision
    model is never run: the verification gives it the image embeddings)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig

    width = config.vision_config.hidden_size
    qformer = Blip2QFormerConfig(
        vocab_size=config.qformer_vocab_size, hidden_size=config.qformer_hidden_size,
        num_hidden_layers=config.qformer_num_hidden_layers, num_attention_heads=config.qformer_num_attention_heads,
        intermediate_size=config.qformer_intermediate_size, cross_attention_frequency=config.cross_attention_frequency,
        layer_norm_eps=config.qformer_layer_norm_eps, max_position_embeddings=config.qformer_max_position_embeddings,
        pad_token_id=config.qformer_pad_token_id, use_qformer_text_input=True)
    vision = dict(hidden_size=width, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1, image_size=1,
                  patch_size=1)  # only its width matters
    reference = Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision, qformer_config=qformer,
                                                       num_query_tokens=config.num_query_tokens,
                                                       image_text_hidden_size=config.embed_dim)).eval()
    missing, unexpected = reference.load_state_dict(rename_keys(source, LAVIS_TO_TRANSFORMERS_RULES), strict=False)
    missing = [key for key in missing if not key.startswith("vision_model.")]
    if missing or unexpected:
        raise ConversionError(f"transformers' Blip2ForImageTextRetrieval does not take the file's tensors: missing "
                              f"{conversion.preview(missing)}, unexpected {conversion.preview(unexpected)}.")
    return reference


def verify_lavis_stage1(path, args, source: dict, config, tower_in_file: bool) -> None:
    """What can be checked without LAVIS: the tower against its directory, ITC and ITM against transformers'
    Blip2ForImageTextRetrieval on the file's tensors (fed our tower's features through LAVIS's `ln_vision`), the ITG
    head against transformers' BERT head on the file's `Qformer.cls` tensors, the temperature."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    model = FusionBlip2ForImageTextRetrieval.from_pretrained(path, dtype=args.dtype).eval()
    inputs = FusionBlip2QFormerProcessor.from_pretrained(path)(images=sample_image(), text=TEXTS, return_tensors="pt")
    features, _ = select_image_features(model.vision_tower, inputs["pixel_values"], layer=config.vision_feature_layer,
                                        strategy=config.vision_feature_select_strategy)  # (1, V, D_v), before ln_vision
    if tower_in_file:
        print("[verify] the vision tower's tensors come from the file (EVA names, as --source lavis maps them): "
              "not compared with a reference")
    else:
        tower = load_vision_tower(args.vision_tower, dtype=args.dtype).eval()
        expected, _ = select_image_features(tower, inputs["pixel_values"], layer=config.vision_feature_layer,
                                            strategy=config.vision_feature_select_strategy)
        compare_logits(f"vision features vs {args.vision_tower}", features, expected, args.atol)

    reference = transformers_retrieval_reference(source, config)
    ln_vision = torch.nn.LayerNorm(features.shape[-1], eps=LAVIS_LN_VISION_EPS)
    ln_vision.load_state_dict({"weight": source["ln_vision.weight"], "bias": source["ln_vision.bias"]})
    image_embeds = ln_vision(features.float())  # (1, V, D_v)
    reference.vision_model = _GivenImageEmbeds(image_embeds)
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    compare_logits("ITC cosine vs transformers' Blip2ForImageTextRetrieval on the file's tensors",
                   model(**inputs).logits_per_image * model.clamped_temperature,
                   reference(pixel_values=None, **text).logits_per_image, args.atol)
    reference.vision_model = _GivenImageEmbeds(image_embeds.expand(len(TEXTS), -1, -1))
    compare_logits("ITM logits vs transformers' Blip2ForImageTextRetrieval on the file's tensors",
                   model(**inputs, use_image_text_matching_head=True).logits_per_image,
                   reference(pixel_values=None, **text, use_image_text_matching_head=True).logits_per_image, args.atol)

    head = BertOnlyMLMHead(BertConfig(hidden_size=config.qformer_hidden_size, vocab_size=config.qformer_vocab_size,
                                      layer_norm_eps=config.qformer_layer_norm_eps, hidden_act="gelu"))
    head.load_state_dict({k[len("Qformer.cls."):]: v for k, v in source.items() if k.startswith("Qformer.cls.")})
    decoder_ids = inputs["input_ids"].clone()
    decoder_ids[:, 0] = config.qformer_bos_token_id  # [DEC] for [CLS], as the ITG pass reads captions
    vision = model.get_vision_embeddings(inputs["pixel_values"]).expand(len(TEXTS), -1, -1)  # (2, V, D_v)
    h = model.qformer(vision, decoder_ids, inputs["attention_mask"], pattern="causal")  # (2, Q + T, D_q)
    compare_logits("ITG head vs transformers' BERT head on the file's Qformer.cls tensors",
                   model.text_generation_logits(vision, decoder_ids, inputs["attention_mask"]),
                   head(h[:, config.num_query_tokens:].float()), args.atol)
    compare_logits(f"temperature weight vs the file's `temp` ({source['temp'].item():.6g})", model.temperature,
                   source["temp"].reshape(1), args.atol)
    if model.clamped_temperature.item() != model.temperature.item():
        print(f"[verify] the temperature the model divides by is {model.clamped_temperature.item():.6g} (clamped), not "
              f"the file's {model.temperature.item():.6g}: ITC logits differ from LAVIS's by that ratio (see above)")
    print("[verify] not checked here (LAVIS does not run in the converter): the ITG pass (each caption token attending "
          "to the queries and the tokens before it) and the three stage-1 losses; vlm-fusion's tests "
          "(tests/test_convert_qformer.py) compare them with LAVIS 1.0.2's own Blip2Qformer")
