"""BLIP-2 stage-1 conversion into `FusionBlip2ForImageTextRetrieval` (`vlm-fusion convert blip2 --source hf-retrieval`
and `--source lavis-stage1`): ITC and ITM equal transformers' Blip2ForImageTextRetrieval, the zero-shot pipeline runs
on the result, the three stage-1 losses (and the negatives' weights) equal LAVIS 1.0.2's own Blip2Qformer, and each
bad input is refused in one line with nothing written."""

import argparse
import json
import shutil
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    BertTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2VisionConfig,
    Blip2VisionModel,
    pipeline,
)

from conftest import assert_reordered, random_image, reorder_bound
from lavis_reference import build_lavis_qformer, lavis_stage1_losses, lavis_state_dict
from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerProcessor
from vlm_fusion.conversion import blip2_common, convert_blip2, convert_blip2_stage1
from vlm_fusion.conversion.common import ConversionError
from vlm_fusion.tools.tiny import tiny_bert_tokenizer, tiny_image_processor
from vlm_fusion.vision import select_image_features

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
               cross_attention_frequency=2, max_position_embeddings=40)  # cross-attention in layers 0 and 2
NUM_QUERY_TOKENS, EMBED_DIM = 5, 16
TEXTS = ["a red circle", "two blue squares on the left", "what is shown in this picture ?"]


def spread(model, seed: int):
    """Weights at the scale of a trained model: matrices N(0, 1/fan_in), embeddings and queries N(0, 1), biases and
    norms moved off 0 / 1 by N(0, 0.1) (so a swapped or dropped one shows). Under BERT's N(0, 0.02) init the queries
    barely see the image: every image's ITC row came out the same to 4 digits, and a wrong image side could hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 0:  # LAVIS's temperature: set on its own
                continue
            if parameter.dim() == 1:
                parameter.add_(noise * 0.1)
            elif parameter.dim() < 4 and any(part in name for part in ("embedding", "query_tokens")):
                parameter.copy_(noise)
            else:  # linear and patch-conv weights
                parameter.copy_(noise / parameter[0].numel() ** 0.5)


def bert_tokenizer():
    """tiny_bert_tokenizer()'s vocabulary as a `BertTokenizer` (Salesforce's class: it emits `token_type_ids`, which
    the Q-Former does not take), with `[DEC]` as its bos token, as transformers' BLIP-2 conversion adds it."""
    tokenizer = BertTokenizer(vocab=tiny_bert_tokenizer().get_vocab())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def run(argv, capsys):
    code = convert_blip2.main([str(a) for a in argv])
    return code, capsys.readouterr()


# ---- transformers' Blip2ForImageTextRetrieval ------------------------------------------------------------------
@pytest.fixture(scope="module", params=["plain", "image-tokens"])
def hf_retrieval(request, tmp_path_factory):
    """A tiny random Blip2ForImageTextRetrieval with its Blip2Processor (which adds `<image>` after the Q-Former's
    vocabulary); with "image-tokens", the processor also writes `num_query_tokens` of them before each caption and the
    config's `image_token_index` makes the model strip them (the layout of transformers' updated Hub processors)."""
    expanded = request.param == "image-tokens"
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    vocab_size = len(tokenizer)  # 60, [DEC] included (Salesforce/blip2-itm-vit-g: 30523)
    processor = Blip2Processor(image_processor=tiny_image_processor(32), tokenizer=tokenizer,
                               num_query_tokens=NUM_QUERY_TOKENS if expanded else None)
    assert tokenizer.convert_tokens_to_ids("<image>") == vocab_size  # past the Q-Former's vocabulary
    config = Blip2Config(vision_config=VISION,
                         qformer_config=dict(QFORMER, vocab_size=vocab_size, use_qformer_text_input=True),
                         num_query_tokens=NUM_QUERY_TOKENS, image_text_hidden_size=EMBED_DIM,
                         image_token_index=vocab_size if expanded else None)
    model = Blip2ForImageTextRetrieval(config).eval()
    spread(model, seed=0)
    root = tmp_path_factory.mktemp(f"hf_retrieval_{request.param}")
    model.save_pretrained(root / "source")
    processor.save_pretrained(root / "source")
    assert convert_blip2.main(["--source", "hf-retrieval", "--input", str(root / "source"),
                               "--output", str(root / "converted")]) == 0
    return root / "source", root / "converted"


def test_hf_retrieval_itc_and_itm_equal_transformers(hf_retrieval):
    source, converted = hf_retrieval
    reference = Blip2ForImageTextRetrieval.from_pretrained(source).eval()
    ours = FusionBlip2ForImageTextRetrieval.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(processor, FusionBlip2QFormerProcessor)
    assert len(processor.tokenizer) == ours.config.qformer_vocab_size == reference.config.qformer_config.vocab_size
    assert "<image>" not in processor.tokenizer.get_vocab()
    dec = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    assert processor.bos_token_id == ours.config.qformer_bos_token_id == dec
    # no ITG head and no temperature in the source: new head (decoder tied), the config's temperature
    assert ours.text_head.decoder.weight.data_ptr() == ours.qformer.word_embeddings.weight.data_ptr()
    assert ours.temperature.item() == pytest.approx(0.07)

    images = [random_image(0), random_image(1)]
    inputs = processor(images=images, text=TEXTS, return_tensors="pt")
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}  # no token types
    assert (inputs["attention_mask"] == 0).any()  # padding is exercised
    source_inputs = Blip2Processor.from_pretrained(source)(images=images, text=TEXTS, padding="longest",
                                                           return_tensors="pt")
    with torch.no_grad():
        itc = ours(**inputs)
        cosine = reference(**source_inputs).logits_per_image  # (2, 3): transformers returns the bare cosine
        pairs = [0, 1, 0]  # ITM: text t with image pairs[t]
        itm = ours(pixel_values=inputs["pixel_values"][pairs], input_ids=inputs["input_ids"],
                   attention_mask=inputs["attention_mask"], use_image_text_matching_head=True).logits_per_image
        itm_reference = reference(**{**source_inputs, "pixel_values": source_inputs["pixel_values"][pairs]},
                                  use_image_text_matching_head=True).logits_per_image
    itc_diff = (itc.logits_per_image * ours.clamped_temperature - cosine).abs().max().item()
    itm_diff = (itm - itm_reference).abs().max().item()
    print(f"[parity] hf-retrieval: ITC cosine max |diff| {itc_diff:.2e}, ITM logits max |diff| {itm_diff:.2e}")
    assert cosine.shape == (2, 3) and itm.shape == (3, 2)
    assert itc_diff <= reorder_bound(cosine) and itm_diff <= reorder_bound(itm_reference)


def test_zero_shot_pipeline_scores_are_the_softmax_of_our_logits(hf_retrieval):
    _, converted = hf_retrieval
    labels = ["red circle", "blue square", "star"]
    image = random_image(2)
    classifier = pipeline("zero-shot-image-classification", model=str(converted))
    scores = {row["label"]: row["score"] for row in classifier(image, candidate_labels=labels)}
    ours = FusionBlip2ForImageTextRetrieval.from_pretrained(converted).eval()
    processor = FusionBlip2QFormerProcessor.from_pretrained(converted)
    inputs = processor(images=image, text=[f"This is a photo of {label}." for label in labels], return_tensors="pt")
    with torch.no_grad():
        expected = ours(**inputs).logits_per_image[0].softmax(-1)
    assert_reordered(torch.tensor([scores[label] for label in labels]), expected)


def test_a_named_image_placeholder_is_removed_for_good(tmp_path):
    """`<image>` past the Q-Former's vocabulary as a named special token (`extra_special_tokens`, as transformers' updated
    Hub tokenizers declare it) leaves the tokenizer, and a save / load does not bring it back."""
    tokenizer = bert_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(tmp_path / "source")
    assert "<image>" in json.loads((tmp_path / "source" / "tokenizer_config.json").read_text())["extra_special_tokens"]
    converted = convert_blip2_stage1.qformer_tokenizer(tmp_path / "source", vocab_size=60, placeholders=["<image>"])
    converted.save_pretrained(tmp_path / "converted")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert len(reloaded) == 60 and "<image>" not in reloaded.get_vocab()
    assert reloaded.get_vocab() == {k: v for k, v in tokenizer.get_vocab().items() if k != "<image>"}
    assert list(reloaded("a red circle")) == ["input_ids", "attention_mask"]


# ---- LAVIS's Blip2Qformer (blip2_pretrained.pth) -----------------------------------------------------------------
LAVIS_TINY = dict(vision_width=VISION["hidden_size"], hidden_size=QFORMER["hidden_size"],
                  num_layers=QFORMER["num_hidden_layers"], num_heads=QFORMER["num_attention_heads"],
                  intermediate_size=QFORMER["intermediate_size"], cross_attention_freq=2,
                  num_query_tokens=NUM_QUERY_TOKENS, vocab_size=len(tiny_bert_tokenizer()) + 1,  # + [DEC]
                  max_position_embeddings=QFORMER["max_position_embeddings"], embed_dim=EMBED_DIM, max_txt_len=12,
                  pad_token_id=0, bos_token_id=len(tiny_bert_tokenizer()))
BATCH, TOKENS = 3, 8


def lavis_args(root, pth, out):
    return ["--source", "lavis-stage1", "--input", pth, "--vision-tower", root / "eva", "--qformer-tokenizer",
            root / "bert", "--qformer-heads", QFORMER["num_attention_heads"], "--output", out]


@pytest.fixture(scope="module")
def lavis_stage1(tmp_path_factory):
    """LAVIS's own Blip2Qformer (tiny, random), its stage-1 file as LAVIS's runner saves it (`{"model": ...}`, no
    frozen tower), an EVA-style tower directory (transformers' Blip2VisionModel) of the width it reads, bert's
    tokenizer without [DEC], and the conversion of all that."""
    lavis = build_lavis_qformer(**LAVIS_TINY, seed=0)  # skips the tests when LAVIS's wheel cannot be had
    spread(lavis, seed=0)
    with torch.no_grad():
        lavis.temp.fill_(0.05)  # not the config's default 0.07: the converted temperature must be the file's
    root = tmp_path_factory.mktemp("lavis_stage1")
    torch.save({"model": lavis_state_dict(lavis), "config": {}, "epoch": 9}, root / "blip2_pretrained.pth")
    torch.manual_seed(1)
    tower = Blip2VisionModel(Blip2VisionConfig(**VISION)).eval()
    spread(tower, seed=1)
    tower.save_pretrained(root / "eva")
    tiny_image_processor(32).save_pretrained(root / "eva")
    tiny_bert_tokenizer().save_pretrained(root / "bert")
    args = lavis_args(root, root / "blip2_pretrained.pth", root / "converted")
    assert convert_blip2.main([str(a) for a in args]) == 0
    return lavis, root


def stage1_batch(processor):
    """3 (image, caption) pairs: captions of 8 tokens, [CLS] first, the second one padded after 5."""
    generator = torch.Generator().manual_seed(2)
    pixel_values = processor(images=[random_image(i) for i in range(BATCH)], return_tensors="pt")["pixel_values"]
    input_ids = torch.randint(5, LAVIS_TINY["bos_token_id"], (BATCH, TOKENS), generator=generator)
    input_ids[:, 0] = processor.tokenizer.cls_token_id
    attention_mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = processor.tokenizer.pad_token_id
    return pixel_values, input_ids, attention_mask


def lavis_image_embeds(model, pixel_values):
    """What LAVIS's `visual_encoder` would give: our tower's features before `vision_layernorm` (LAVIS applies its
    `ln_vision` itself)."""
    return select_image_features(model.vision_tower, pixel_values, layer=model.config.vision_feature_layer,
                                 strategy=model.config.vision_feature_select_strategy)[0]


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_all_near(diffs: dict, references: dict) -> None:
    """Each max |difference| within what float32 summation order explains at the reference's scale (ITG logits reach
    ~20 here, ITC logits ~10): FLOAT32_REORDER x max(1, largest |reference value|)."""
    print("[parity] " + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
    for name, diff in diffs.items():
        assert diff <= reorder_bound(references[name]), (name, diff)


def test_lavis_stage1_losses_equal_lavis(lavis_stage1):
    lavis, root = lavis_stage1
    model = FusionBlip2ForImageTextRetrieval.from_pretrained(root / "converted").eval()
    processor = FusionBlip2QFormerProcessor.from_pretrained(root / "converted")
    assert processor.bos_token_id == LAVIS_TINY["bos_token_id"] == model.config.qformer_bos_token_id
    assert model.temperature.item() == model.config.temperature == pytest.approx(0.05)  # the file's `temp`
    pixel_values, input_ids, attention_mask = stage1_batch(processor)
    negative_image, negative_text = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                     negative_image_index=negative_image, negative_text_index=negative_text)
        theirs = lavis_stage1_losses(lavis, lavis_image_embeds(model, pixel_values), input_ids, attention_mask,
                                     negative_image_index=negative_image.tolist(),
                                     negative_text_index=negative_text.tolist())
        vision = model.get_vision_embeddings(pixel_values)  # (B, V, D_v)
        # ITM rows as LAVIS's: positives, (text b, negative image), (image b, negative text)
        itm_logits = model.image_text_matching(
            torch.cat([vision, vision[negative_image], vision]),
            torch.cat([input_ids, input_ids, input_ids[negative_text]]),
            torch.cat([attention_mask, attention_mask, attention_mask[negative_text]]))
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = model.config.qformer_bos_token_id
        itg_logits = model.text_generation_logits(vision, decoder_ids, attention_mask)
    pairs = {"loss": (ours.loss, theirs["loss"]), "loss_itc": (ours.loss_itc, theirs["loss_itc"]),
             "loss_itm": (ours.loss_itm, theirs["loss_itm"]), "loss_itg": (ours.loss_itg, theirs["loss_lm"]),
             "sim_i2t": (ours.logits_per_image, theirs["sim_i2t"]),
             "sim_t2i": (ours.logits_per_text, theirs["sim_t2i"]),
             "image_feats": (ours.image_embeds, theirs["image_feats"]),
             "text_feat": (ours.text_embeds, theirs["text_feat"]),
             "itm_logits": (itm_logits, theirs["itm_logits"]), "itg_logits": (itg_logits, theirs["lm_logits"])}
    assert ours.logits_per_image.std(0).min() > 0.1  # each image scores the captions its own way
    assert_all_near({name: max_diff(a, b) for name, (a, b) in pairs.items()},
                    {name: b.detach() for name, (a, b) in pairs.items()})


def test_negatives_are_drawn_with_lavis_weights(lavis_stage1):
    """`draw_negatives`' weights are LAVIS's `weights_t2i` (negative images) and `weights_i2t` (negative texts); and
    with the negatives it drew, ITM's loss is LAVIS's."""
    lavis, root = lavis_stage1
    model = FusionBlip2ForImageTextRetrieval.from_pretrained(root / "converted").eval()
    processor = FusionBlip2QFormerProcessor.from_pretrained(root / "converted")
    pixel_values, input_ids, attention_mask = stage1_batch(processor)
    draws, multinomial = [], torch.multinomial

    def spy(weights, num_samples, *args, **kwargs):
        drawn = multinomial(weights, num_samples, *args, **kwargs)
        draws.append((weights.clone(), drawn.squeeze(1)))
        return drawn

    with torch.no_grad(), mock.patch.object(torch, "multinomial", spy):
        ours = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                     negatives_generator=torch.Generator().manual_seed(0))
    assert len(draws) == 2  # negative images (one per text), then negative texts (one per image)
    (weights_t2i, negative_image), (weights_i2t, negative_text) = draws
    with torch.no_grad():
        theirs = lavis_stage1_losses(lavis, lavis_image_embeds(model, pixel_values), input_ids, attention_mask,
                                     negative_image_index=negative_image.tolist(),
                                     negative_text_index=negative_text.tolist())
    pairs = {"weights_t2i": (weights_t2i, theirs["weights_t2i"]), "weights_i2t": (weights_i2t, theirs["weights_i2t"]),
             "loss_itm (drawn negatives)": (ours.loss_itm, theirs["loss_itm"])}
    assert_all_near({name: max_diff(a, b) for name, (a, b) in pairs.items()},
                    {name: b.detach() for name, (a, b) in pairs.items()})


def test_converted_stage1_trains_in_bfloat16(lavis_stage1):
    """Loaded in bf16, the Q-Former and the ITG head (its decoder is the Q-Former's word embeddings) stay fp32 and the
    three losses are computed, close to fp32's."""
    _, root = lavis_stage1
    processor = FusionBlip2QFormerProcessor.from_pretrained(root / "converted")
    pixel_values, input_ids, attention_mask = stage1_batch(processor)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = FusionBlip2ForImageTextRetrieval.from_pretrained(root / "converted", dtype=dtype).eval()
        assert model.text_head.dense.weight.dtype == model.qformer.word_embeddings.weight.dtype == torch.float32
        with torch.no_grad():
            out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                        negative_image_index=torch.tensor([1, 2, 0]), negative_text_index=torch.tensor([2, 0, 1]))
        losses[dtype] = torch.stack([out.loss_itc, out.loss_itm, out.loss_itg]).float()
    # The tower runs in bf16 (unit roundoff 2^-8 = 3.9e-3): its features reach the fp32 Q-Former off by a few roundings
    # of their scale, about 1 %; the losses, smooth in those features, move by as much: 2 % of each, or 0.1 where a
    # loss is near 0 (a loss of 0.01 off by 2 % would ask more of bf16 than its 3 significant digits).
    torch.testing.assert_close(losses[torch.bfloat16], losses[torch.float32], atol=0.1, rtol=0.02)


def eva_state_dict(tower: Blip2VisionModel) -> dict:
    """A Blip2VisionModel's tensors under LAVIS's EVA names (`visual_encoder.*`, q and v biases, no k bias)."""
    embeddings = tower.embeddings
    out = {"visual_encoder.cls_token": embeddings.class_embedding,
           "visual_encoder.pos_embed": embeddings.position_embedding,
           "visual_encoder.patch_embed.proj.weight": embeddings.patch_embedding.weight,
           "visual_encoder.patch_embed.proj.bias": embeddings.patch_embedding.bias}
    for i, layer in enumerate(tower.encoder.layers):
        prefix, d = f"visual_encoder.blocks.{i}.", layer.self_attn.qkv.bias.shape[0] // 3
        out.update({prefix + "norm1.weight": layer.layer_norm1.weight, prefix + "norm1.bias": layer.layer_norm1.bias,
                    prefix + "norm2.weight": layer.layer_norm2.weight, prefix + "norm2.bias": layer.layer_norm2.bias,
                    prefix + "attn.qkv.weight": layer.self_attn.qkv.weight,
                    prefix + "attn.q_bias": layer.self_attn.qkv.bias[:d],
                    prefix + "attn.v_bias": layer.self_attn.qkv.bias[2 * d:],
                    prefix + "attn.proj.weight": layer.self_attn.projection.weight,
                    prefix + "attn.proj.bias": layer.self_attn.projection.bias,
                    prefix + "mlp.fc1.weight": layer.mlp.fc1.weight, prefix + "mlp.fc1.bias": layer.mlp.fc1.bias,
                    prefix + "mlp.fc2.weight": layer.mlp.fc2.weight, prefix + "mlp.fc2.bias": layer.mlp.fc2.bias})
    return {key: value.detach().clone() for key, value in out.items()}


def test_lavis_stage1_with_the_eva_tower_in_the_file(lavis_stage1, tmp_path, capsys):
    """A stage-1 file that also holds the EVA tower (LAVIS with freeze_vit=False): the tower comes from the file, its
    unused `post_layernorm` gets `ln_vision` (as transformers' conversion gives it), the Q-Former side is unchanged."""
    _, root = lavis_stage1
    torch.manual_seed(3)
    eva = Blip2VisionModel(Blip2VisionConfig(**VISION)).eval()
    spread(eva, seed=3)
    with torch.no_grad():  # EVA has no k bias
        for layer in eva.encoder.layers:
            layer.self_attn.qkv.bias[VISION["hidden_size"]: 2 * VISION["hidden_size"]] = 0
    state = torch.load(root / "blip2_pretrained.pth")["model"]
    torch.save({**state, **eva_state_dict(eva)}, tmp_path / "with_eva.pth")
    code, output = run(lavis_args(root, tmp_path / "with_eva.pth", tmp_path / "converted"), capsys)
    assert code == 0, output.err
    assert "come from the file" in output.out
    ours = FusionBlip2ForImageTextRetrieval.from_pretrained(tmp_path / "converted").state_dict()
    for key, value in eva.state_dict().items():
        expected = state["ln_vision." + key.split(".")[-1]] if key.startswith("post_layernorm.") else value
        assert torch.equal(ours["vision_tower." + key], expected), key
    without = FusionBlip2ForImageTextRetrieval.from_pretrained(root / "converted").state_dict()
    assert all(torch.equal(value, without[key]) for key, value in ours.items() if not key.startswith("vision_tower."))


# ---- what the file does not record: the head count; the temperature as the model uses it ------------------------
def without_flag(args, flag="--qformer-heads"):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def test_a_4_head_file_without_the_flag_is_refused_rather_than_made_12_heads(lavis_stage1, tmp_path, capsys):
    """The file records no head count and the verification cannot see one (its reference uses the same count): a
    32-wide Q-Former is not BLIP-2's 768-wide one, so no default is guessed."""
    _, root = lavis_stage1
    code, output = run(without_flag(lavis_args(root, root / "blip2_pretrained.pth", tmp_path / "out")), capsys)
    assert_refused(code, output, tmp_path / "out", "does not record the Q-Former's attention heads",
                   "its width 32 is not BLIP-2's 768", "--qformer-heads N")


def test_the_head_count_comes_from_a_config_beside_the_file_and_is_said(lavis_stage1, tmp_path, capsys):
    _, root = lavis_stage1
    shutil.copy(root / "blip2_pretrained.pth", tmp_path / "blip2_pretrained.pth")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": QFORMER["num_attention_heads"]}))
    args = without_flag(lavis_args(root, tmp_path / "blip2_pretrained.pth", tmp_path / "converted"))
    code, output = run(args, capsys)
    assert code == 0, output.err
    assert f"[qformer] 4 attention heads, from {tmp_path / 'config.json'}" in output.out
    assert AutoConfig.from_pretrained(tmp_path / "converted").qformer_num_attention_heads == 4
    code, output = run(lavis_args(root, tmp_path / "blip2_pretrained.pth", tmp_path / "converted")[:-4]
                       + ["--qformer-heads", "8", "--output", tmp_path / "out"], capsys)  # the flag contradicts it
    assert_refused(code, output, tmp_path / "out", "--qformer-heads 8", "records 4 attention heads")


def test_the_flag_says_where_the_head_count_came_from(lavis_stage1, capsys):
    """The module fixture converted with --qformer-heads 4; a count that does not divide the width is refused; BLIP-2's
    768-wide Q-Former without any record gets 12, said to be assumed."""
    _, root = lavis_stage1
    args = argparse.Namespace(input=str(root / "blip2_pretrained.pth"), qformer_tokenizer=str(root / "bert"),
                              qformer_heads=None)
    assert blip2_common.qformer_heads(args, 768)[0] == 12
    assert "[qformer] 12 attention heads, from BLIP-2's default" in capsys.readouterr().out
    with pytest.raises(ConversionError, match="5 attention heads .from --qformer-heads. do not divide it"):
        blip2_common.qformer_heads(argparse.Namespace(**{**vars(args), "qformer_heads": 5}), 32)
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": 2}))
    try:  # the tokenizer's BERT config (bert-base-uncased's, where LAVIS reads the Q-Former's from)
        assert blip2_common.qformer_heads(args, 32)[0] == 2
        assert "the --qformer-tokenizer's BERT config" in capsys.readouterr().out
    finally:
        (root / "bert" / "config.json").unlink()


def test_a_temperature_outside_the_clamp_is_kept_and_the_clamp_is_said(lavis_stage1, tmp_path, capsys):
    """LAVIS's Blip2Qformer divides by `temp` as it is; vlm-fusion's model clamps it to [0.001, 0.5] as BLIP does. A
    file whose `temp` is 0.0005 keeps it in the weight, and the converter says that the model's ITC logits are half
    LAVIS's, where it printed a temperature difference of 0."""
    _, root = lavis_stage1
    checkpoint = torch.load(root / "blip2_pretrained.pth")
    checkpoint["model"]["temp"] = torch.tensor(0.0005)
    torch.save(checkpoint, tmp_path / "cold.pth")
    code, output = run(lavis_args(root, tmp_path / "cold.pth", tmp_path / "converted"), capsys)
    assert code == 0, output.err
    assert "[temperature] the file's `temp` 0.0005 is outside [0.001, 0.5]: the weight keeps it" in output.out
    assert "our ITC logits are 0.5x LAVIS's" in output.out
    assert "the temperature the model divides by is 0.001 (clamped), not the file's 0.0005" in output.out
    model = FusionBlip2ForImageTextRetrieval.from_pretrained(tmp_path / "converted")
    assert model.temperature.item() == torch.tensor(0.0005).item()  # the file's value, as float32 holds it
    assert model.clamped_temperature.item() == pytest.approx(0.001) and model.config.temperature == 0.001
    code, output = run(lavis_args(root, root / "blip2_pretrained.pth", tmp_path / "again"), capsys)
    assert code == 0 and "[temperature]" not in output.out  # 0.05, inside: nothing to say


def test_the_converted_folder_names_no_temporary_folder_nor_machine_path(lavis_stage1):
    """The card was titled with the converter's temporary folder (`# .converted.partial-...`), and the tokenizer kept
    the `local_files_only` it was loaded with."""
    from test_publishing import machine_paths

    _, root = lavis_stage1
    card = (root / "converted" / "README.md").read_text()
    assert "\n# converted\n" in card and ".partial-" not in card
    assert machine_paths(root / "converted", str(root)) == {}
    assert "local_files_only" not in (root / "converted" / "tokenizer_config.json").read_text()


# ---- bad inputs: one line, nothing written ---------------------------------------------------------------------
def assert_refused(code, output, out, *needles):
    assert code == 1 and len(output.err.strip().splitlines()) == 1, output.err
    assert all(needle in output.err for needle in needles), output.err
    assert not out.exists()


def test_hf_retrieval_refuses_another_model_type(lavis_stage1, tmp_path, capsys):
    _, root = lavis_stage1  # a Blip2VisionModel directory: model_type blip_2_vision_model
    code, output = run(["--source", "hf-retrieval", "--input", root / "eva", "--output", tmp_path / "out"], capsys)
    assert_refused(code, output, tmp_path / "out", "expects a `blip-2` config", "'blip_2_vision_model'")


def test_hf_retrieval_refuses_a_generation_checkpoint(hf_retrieval, tmp_path, capsys):
    source, _ = hf_retrieval
    shutil.copytree(source, tmp_path / "generation")
    config = json.loads((tmp_path / "generation" / "config.json").read_text())
    (tmp_path / "generation" / "config.json").write_text(
        json.dumps({**config, "architectures": ["Blip2ForConditionalGeneration"]}))
    code, output = run(["--source", "hf-retrieval", "--input", tmp_path / "generation", "--output", tmp_path / "out"],
                       capsys)
    assert_refused(code, output, tmp_path / "out", "Blip2ForConditionalGeneration", "--source hf")


def test_lavis_stage1_refuses_a_file_without_the_text_branch(lavis_stage1, tmp_path, capsys):
    _, root = lavis_stage1
    state = torch.load(root / "blip2_pretrained.pth")["model"]
    torch.save({k: v for k, v in state.items() if not k.startswith("Qformer.cls.")}, tmp_path / "no_cls.pth")
    code, output = run(lavis_args(root, tmp_path / "no_cls.pth", tmp_path / "out"), capsys)
    assert_refused(code, output, tmp_path / "out", "not a LAVIS stage-1", "Qformer.cls.predictions.bias")


def test_lavis_stage1_refuses_an_unconsumed_key(lavis_stage1, tmp_path, capsys):
    _, root = lavis_stage1
    state = torch.load(root / "blip2_pretrained.pth")["model"]
    state["Qformer.bert.pooler.dense.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "pooler.pth")
    code, output = run(lavis_args(root, tmp_path / "pooler.pth", tmp_path / "out"), capsys)
    assert_refused(code, output, tmp_path / "out", "Qformer.bert.pooler.dense.weight")


def test_lavis_stage1_refuses_another_vocabulary(lavis_stage1, tmp_path, capsys):
    _, root = lavis_stage1
    tokenizer = tiny_bert_tokenizer()
    tokenizer.add_tokens(["zebra"])  # one word more than the Q-Former's vocabulary
    tokenizer.save_pretrained(tmp_path / "bert")
    shutil.copytree(root / "eva", tmp_path / "eva")
    code, output = run(lavis_args(tmp_path, root / "blip2_pretrained.pth", tmp_path / "out"), capsys)
    assert_refused(code, output, tmp_path / "out", "61 tokens", "60 rows")
