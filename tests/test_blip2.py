"""The BLIP-2-style family: parity with transformers' Blip2 through the conversion script, LAVIS layout, invariants."""

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2VisionModel,
)

from conftest import assert_same_logits, load_script, random_image, reorder_bound
from vlm_fusion import FusionBlip2Config, FusionBlip2ForConditionalGeneration, FusionBlip2Processor
from vlm_fusion.tools.tiny import (
    WORDS,
    tiny_image_processor,
    tiny_model_and_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

from vlm_fusion.conversion import convert_blip2  # noqa: E402

convert_blip2_script = load_script("convert_blip2")  # the command-line entry point
QFORMER = dict(num_query_tokens=8, qformer_hidden_size=64, qformer_num_hidden_layers=3, qformer_num_attention_heads=4,
               qformer_intermediate_size=128)
PROMPTS = ["Question: what is shown ? Answer:", "Question: how many shapes are there in this image ? Answer:"]


def build(vision="clip", text="llama", **kwargs):
    return tiny_model_and_processor("fusion_blip2", vision, text, **{**QFORMER, **kwargs})


@pytest.fixture(scope="module")
def blip2_hf_dir(tmp_path_factory):
    """A tiny transformers Blip2ForConditionalGeneration (EVA-style Blip2VisionModel + OPT) with its Blip2Processor."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    vision = {k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"}
    config = Blip2Config(
        vision_config=vision,
        qformer_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=64, cross_attention_frequency=2),
        text_config=tiny_text_config("opt", vocab_size=len(tokenizer)),
        num_query_tokens=8, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and queries, so a wrong mapping cannot hide behind identity init
        for name, param in model.named_parameters():
            if "layernorm" in name.lower() or "query_tokens" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("blip2_hf")
    model.save_pretrained(path)
    Blip2Processor(image_processor=tiny_image_processor(32), tokenizer=tokenizer, num_query_tokens=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(blip2_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "fusion"
    assert convert_blip2_script.main(["--source", "hf", "--input", str(blip2_hf_dir), "--output", str(out)]) == 0
    return out


def test_hf_blip2_logits_and_greedy_tokens_match_transformers(blip2_hf_dir, converted):
    reference = Blip2ForConditionalGeneration.from_pretrained(blip2_hf_dir).eval()
    reference_processor = Blip2Processor.from_pretrained(blip2_hf_dir)
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(ours, FusionBlip2ForConditionalGeneration) and isinstance(processor, FusionBlip2Processor)
    processor.tokenizer.padding_side = reference_processor.tokenizer.padding_side = "left"
    images = [random_image(0), random_image(1)]
    for prompt, image in zip(PROMPTS, images):  # queries before BOS, as Blip2Processor
        ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, reference_processor(images=image, text=prompt, return_tensors="pt")["input_ids"])
    # Batched, we pad at the far left; Blip2Processor pads between the queries and the text. Same ids to both models.
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    assert (inputs["input_ids"][0, :5] == processor.tokenizer.pad_token_id).all()
    for batch in ({k: v[:1] for k, v in inputs.items()}, inputs):  # single, then batched with left padding
        assert_same_logits(f"blip2 hf parity ({len(batch['input_ids'])} samples)", ours, reference, batch)
    with torch.no_grad():
        assert torch.equal(ours.generate(**inputs, max_new_tokens=8, do_sample=False),
                           reference.generate(**inputs, max_new_tokens=8, do_sample=False))


def lavis_state_dict(model: Blip2ForConditionalGeneration) -> dict:
    """The tiny HF weights laid out as LAVIS' blip2_opt checkpoint (EVA ViT with q/v biases, Qformer.bert.*)."""
    out = {"query_tokens": model.query_tokens, "ln_vision.weight": model.vision_model.post_layernorm.weight,
           "ln_vision.bias": model.vision_model.post_layernorm.bias,
           "Qformer.bert.embeddings.LayerNorm.weight": model.qformer.layernorm.weight,
           "Qformer.bert.embeddings.LayerNorm.bias": model.qformer.layernorm.bias,
           "opt_proj.weight": model.language_projection.weight, "opt_proj.bias": model.language_projection.bias}
    emb = model.vision_model.embeddings
    out.update({"visual_encoder.cls_token": emb.class_embedding, "visual_encoder.pos_embed": emb.position_embedding,
                "visual_encoder.patch_embed.proj.weight": emb.patch_embedding.weight,
                "visual_encoder.patch_embed.proj.bias": emb.patch_embedding.bias})
    for i, layer in enumerate(model.vision_model.encoder.layers):
        p, d = f"visual_encoder.blocks.{i}.", layer.self_attn.qkv.bias.shape[0] // 3
        out.update({p + "norm1.weight": layer.layer_norm1.weight, p + "norm1.bias": layer.layer_norm1.bias,
                    p + "norm2.weight": layer.layer_norm2.weight, p + "norm2.bias": layer.layer_norm2.bias,
                    p + "attn.qkv.weight": layer.self_attn.qkv.weight,
                    p + "attn.q_bias": layer.self_attn.qkv.bias[:d], p + "attn.v_bias": layer.self_attn.qkv.bias[2 * d:],
                    p + "attn.proj.weight": layer.self_attn.projection.weight,
                    p + "attn.proj.bias": layer.self_attn.projection.bias,
                    p + "mlp.fc1.weight": layer.mlp.fc1.weight, p + "mlp.fc1.bias": layer.mlp.fc1.bias,
                    p + "mlp.fc2.weight": layer.mlp.fc2.weight, p + "mlp.fc2.bias": layer.mlp.fc2.bias})
    for name, tensor in model.qformer.encoder.state_dict().items():
        out["Qformer.bert.encoder." + name.replace("attention.attention.", "attention.self.")] = tensor
    for i in range(len(model.qformer.encoder.layer)):  # the text branch LAVIS also saves
        out[f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = torch.zeros(128, 64)
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def lavis_dirs(blip2_hf_dir, tmp_path_factory):
    """The tiny model as LAVIS ships it (.pth) plus the tower and LM directories, and the same model in HF layout."""
    root = tmp_path_factory.mktemp("lavis")
    reference = Blip2ForConditionalGeneration.from_pretrained(blip2_hf_dir)
    assert reference.vision_model.encoder.layers[0].self_attn.qkv.bias[64:128].abs().sum() != 0  # HF has a k bias
    with torch.no_grad():  # EVA has none: zero it in the reference so both layouts hold the same model
        for layer in reference.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[64:128] = 0
    reference.save_pretrained(root / "hf_no_k_bias")
    Blip2Processor.from_pretrained(blip2_hf_dir).save_pretrained(root / "hf_no_k_bias")
    torch.save(lavis_state_dict(reference), root / "blip2_opt.pth")
    Blip2VisionModel(reference.config.vision_config).save_pretrained(root / "eva")  # config: weights are in the .pth
    tiny_image_processor(32).save_pretrained(root / "eva")
    reference.language_model.save_pretrained(root / "opt")
    Blip2Processor.from_pretrained(blip2_hf_dir).tokenizer.save_pretrained(root / "opt")
    return root


def lavis_args(root, pth, out):
    return ["--source", "lavis", "--input", str(pth), "--vision-tower", str(root / "eva"), "--language-model",
            str(root / "opt"), "--qformer-heads", "4", "--output", str(out)]


def test_lavis_layout_converts_to_the_same_model(lavis_dirs, tmp_path):
    assert convert_blip2.main(lavis_args(lavis_dirs, lavis_dirs / "blip2_opt.pth", tmp_path / "from_lavis")) == 0
    assert convert_blip2.main(["--source", "hf", "--input", str(lavis_dirs / "hf_no_k_bias"),
                               "--output", str(tmp_path / "from_hf")]) == 0
    a = FusionBlip2ForConditionalGeneration.from_pretrained(tmp_path / "from_lavis").state_dict()
    b = FusionBlip2ForConditionalGeneration.from_pretrained(tmp_path / "from_hf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unconsumed_key_fails(lavis_dirs, tmp_path, capsys):
    state = torch.load(lavis_dirs / "blip2_opt.pth")
    state["Qformer.bert.pooler.dense.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    assert convert_blip2.main(lavis_args(lavis_dirs, tmp_path / "bad.pth", tmp_path / "out")) == 1
    assert "Qformer.bert.pooler.dense.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- invariants ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision, text", [("clip", "llama"), ("siglip", "gpt2"), ("dinov2", "opt")])
def test_round_trip_and_cached_generation(vision, text, tmp_path):
    model, processor = build(vision, text)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    processor = AutoProcessor.from_pretrained(tmp_path)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(0), random_image(1)], text=PROMPTS, padding=True, return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist() == [8, 8]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    cached = loaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, loaded.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False))


def test_the_lm_sees_num_query_tokens_whatever_the_resolution():
    model, _ = build("dinov2", "llama")  # DINOv2 interpolates its position embeddings to any resolution
    seen = []
    model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.shape[1]))
    low, high = (model.get_image_features(torch.randn(1, 3, s, s)).pooler_output for s in (32, 64))
    assert seen == [1 + 16, 1 + 64]  # the vision tower sees 4x the patches...
    assert low.shape == high.shape == (1, 8, 64)  # ...the LM sees N_q = 8 tokens either way
    for size in (32, 64):
        processor = FusionBlip2Processor(image_processor=tiny_image_processor(size), tokenizer=tiny_tokenizer(),
                                         image_seq_length=model.config.num_image_tokens())
        inputs = processor(images=random_image(0, (size, size)), text=PROMPTS[0], return_tensors="pt")
        text_length = len(processor.tokenizer(PROMPTS[0]).input_ids)
        assert inputs["pixel_values"].shape[-1] == size and inputs["input_ids"].shape[1] == 8 + text_length
        assert model(**inputs).logits.shape[1] == 8 + text_length


def test_labels_at_query_positions_are_ignored_and_prompt_with_image_token_works():
    model, processor = build()
    inputs = processor(images=[random_image(0)], text=["USER: <image>\nwhat is shown ?"], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[:2] == [4, 7] and ids[2:10] == [processor.image_token_id] * 8  # placeholders where <image> stands
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    logits = model(**inputs).logits
    targets = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("field, value", [("num_query_tokens", 0), ("qformer_num_attention_heads", 5),
                                          ("cross_attention_frequency", 0), ("qformer_dropout", 1.5),
                                          ("vision_feature_select_strategy", "cls")])
def test_invalid_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "qformer_num_attention_heads" else "divisible"):
        FusionBlip2Config(**{**QFORMER, field: value})


def test_mismatched_image_tokens_raise():
    model, processor = build()
    inputs = processor(images=[random_image(0)], text=PROMPTS[0], return_tensors="pt")
    with pytest.raises(ValueError, match=r"8 image tokens.*16 features"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="one image each"):
        processor(images=[random_image(0), random_image(1)], text=PROMPTS[0])


def lavis_training_checkpoint(reference) -> dict:
    """What LAVIS's runner (`_save_checkpoint`) writes for `Blip2OPT` trained with its defaults: `{"model": ...,
    "optimizer", "config", "scaler", "epoch"}`, the state dict less every parameter that does not require grad.
    Blip2OPT freezes the EVA ViT and OPT and drops the Q-Former's text branch (`cls`, word/position embeddings, each
    layer's `intermediate` / `output`). Buffers are not parameters, so `Qformer.bert.embeddings.position_ids` stays;
    `named_parameters()` lists OPT's tied head once, as `embed_tokens`, so `opt_model.lm_head.weight` stays too."""
    state = {k: v for k, v in lavis_state_dict(reference).items()
             if not k.startswith("visual_encoder.") and ".intermediate.dense." not in k}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    state["opt_model.lm_head.weight"] = reference.language_model.get_output_embeddings().weight.detach().clone()
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "config": {"model": {"arch": "blip2_opt", "freeze_vit": True}}, "scaler": None, "epoch": 4}


def test_a_checkpoint_as_lavis_training_writes_it_converts(lavis_dirs, tmp_path, capsys):
    reference = Blip2ForConditionalGeneration.from_pretrained(lavis_dirs / "hf_no_k_bias")
    reference.vision_model.save_pretrained(tmp_path / "eva")  # the frozen tower comes from its own directory
    tiny_image_processor(32).save_pretrained(tmp_path / "eva")
    torch.save(lavis_training_checkpoint(reference), tmp_path / "checkpoint_4.pth")
    args = lavis_args(lavis_dirs, tmp_path / "checkpoint_4.pth", tmp_path / "from_lavis")
    args[args.index("--vision-tower") + 1] = str(tmp_path / "eva")
    assert convert_blip2.main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "[language_model] the checkpoint holds 1 of its" in printed
    assert convert_blip2.main(["--source", "hf", "--input", str(lavis_dirs / "hf_no_k_bias"),
                               "--output", str(tmp_path / "from_hf")]) == 0
    ours = FusionBlip2ForConditionalGeneration.from_pretrained(tmp_path / "from_lavis").eval()
    a, b = ours.state_dict(), FusionBlip2ForConditionalGeneration.from_pretrained(tmp_path / "from_hf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.config.vision_layer_norm_eps == 1e-5  # LAVIS's ln_vision is nn.LayerNorm's default
    processor = AutoProcessor.from_pretrained(tmp_path / "from_lavis")
    inputs = processor(images=[random_image(0)], text=["what is shown ?"], return_tensors="pt")
    # the reference normalises the tower's output with LAVIS's eps too, so that both compute the same math
    reference.vision_model.post_layernorm.eps = ours.config.vision_layer_norm_eps
    with torch.no_grad():
        expected = reference(**inputs).logits
        diff = (ours(**inputs).logits - expected).abs().max().item()
    print(f"LAVIS training checkpoint vs transformers Blip2: max |dlogit| = {diff:.2e}")
    assert diff <= reorder_bound(expected)


def test_a_lavis_file_without_query_tokens_is_refused_in_one_line(lavis_dirs, tmp_path, capsys):
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 64)}, "epoch": 0}, tmp_path / "other.pth")
    assert convert_blip2.main(lavis_args(lavis_dirs, tmp_path / "other.pth", tmp_path / "out")) == 1
    assert "no `query_tokens`" in capsys.readouterr().err


# ---- InstructBLIP: the instruction-aware Q-Former -------------------------------------------------------------------
@pytest.fixture(scope="module")
def instructblip_hf_dir(tmp_path_factory):
    """A tiny transformers InstructBlipForConditionalGeneration (EVA ViT + OPT) with its InstructBlipProcessor, whose
    Q-Former tokenizer has a vocabulary of its own."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    qformer_tokenizer = tiny_tokenizer(list(reversed(WORDS)))  # other ids for the same words
    vision = {k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"}
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                            cross_attention_frequency=2, vocab_size=len(qformer_tokenizer), max_position_embeddings=32,
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=tiny_text_config("opt", vocab_size=len(tokenizer)),
        num_query_tokens=8, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms, queries and text embeddings
        for name, param in model.named_parameters():
            if "layernorm" in name.lower() or "query_tokens" in name or name.endswith("bias") or "embeddings" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("instructblip_hf")
    model.save_pretrained(path)
    InstructBlipProcessor(image_processor=tiny_image_processor(32), tokenizer=tokenizer,
                          qformer_tokenizer=qformer_tokenizer, num_query_tokens=8).save_pretrained(path)
    return path


def test_instructblip_converts_and_matches_transformers(instructblip_hf_dir, tmp_path):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from vlm_fusion import FusionInstructBlipProcessor

    out = tmp_path / "fusion"
    assert convert_blip2.main(["--source", "instructblip", "--input", str(instructblip_hf_dir),
                               "--output", str(out)]) == 0
    reference = InstructBlipForConditionalGeneration.from_pretrained(instructblip_hf_dir).eval()
    reference_processor = InstructBlipProcessor.from_pretrained(instructblip_hf_dir)
    ours = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, FusionInstructBlipProcessor) and ours.config.qformer_text_input
    assert "Instruction-aware, as InstructBLIP" in (out / "README.md").read_text()
    images = [random_image(0), random_image(1)]
    for prompt, image in zip(PROMPTS, images):  # both token streams as InstructBlipProcessor makes them
        mine, theirs = (p(images=image, text=prompt, return_tensors="pt") for p in (processor, reference_processor))
        for key in ("input_ids", "qformer_input_ids", "qformer_attention_mask"):
            assert torch.equal(mine[key], theirs[key]), key
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")  # instructions of 2 lengths
    assert inputs["qformer_attention_mask"].sum(-1).tolist()[0] < inputs["qformer_input_ids"].shape[1]
    for batch in ({k: v[:1] for k, v in inputs.items()}, inputs):  # single, then batched (both streams padded)
        assert_same_logits(f"instructblip parity ({len(batch['input_ids'])} samples)", ours, reference, batch)
    with torch.no_grad():
        greedy = ours.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(greedy, reference.generate(**inputs, max_new_tokens=8, do_sample=False))
        beams = ours.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
        assert torch.equal(beams, reference.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False))
        # The instruction matters: another one gives other visual tokens.
        other = dict(inputs, qformer_input_ids=inputs["qformer_input_ids"].flip(-1))
        assert not torch.allclose(ours(**other).logits, ours(**inputs).logits)
    with pytest.raises(ValueError, match="pass `qformer_input_ids`"):
        ours(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    # Two images in one prompt: each reads that prompt's instruction.
    two = processor(images=images, text=["<image> <image> " + PROMPTS[0]], return_tensors="pt")
    assert two["qformer_input_ids"].shape[0] == 1 and (two["input_ids"] == processor.image_token_id).sum() == 16
    with torch.no_grad():
        visual = ours.model.get_image_features(two["pixel_values"], qformer_input_ids=two["qformer_input_ids"].repeat(2, 1),
                                               qformer_attention_mask=two["qformer_attention_mask"].repeat(2, 1))
        spliced = ours.model(**two).image_hidden_states
    assert torch.equal(spliced, visual.pooler_output)
