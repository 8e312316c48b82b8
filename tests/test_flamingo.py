"""The Flamingo-style family: parity with OpenFlamingo's own modules, zero-gate identity, media masking, caching."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

from conftest import assert_same_logits, causal_lm_of, load_script, random_image, reorder_bound, save_tiny_idefics
from vlm_fusion import FusionFlamingoConfig, FusionFlamingoForConditionalGeneration, FusionFlamingoProcessor
from vlm_fusion.tools.tiny import (
    tiny_image_processor,
    tiny_model_and_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

from vlm_fusion.conversion import convert_openflamingo  # noqa: E402

convert_openflamingo_script = load_script("convert_openflamingo")  # the command-line entry point
SMALL = dict(num_latents=4, perceiver_depth=2, perceiver_heads=2, perceiver_head_dim=16, cross_attention_heads=2,
             cross_attention_head_dim=16)
PROMPTS = ["<image>a red circle<|endofchunk|><image>a", "what is this ? <image> a"]
LMS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


def build(text="llama", open_gates=True, **kwargs):
    model, processor = tiny_model_and_processor("fusion_flamingo", "clip", text, **{**SMALL, **kwargs})
    if open_gates:  # a fresh model is its LM; open the gates so the images matter
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.8)
                block.ff_gate.fill_(0.4)
    processor.tokenizer.padding_side = "left"
    return model, processor


def interleaved(processor):
    images = [[random_image(0), random_image(1)], [random_image(2)]]
    return processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")


# ---- parity with OpenFlamingo ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openflamingo(tmp_path_factory):
    """A tiny OpenFlamingo (its own classes; CLIP tower, Llama LM), its released-style checkpoint and base parts."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("openflamingo")
    tower = CLIPVisionModel(AutoConfig.for_model(**tiny_vision_config("clip"))).eval()
    tower.save_pretrained(root / "clip")
    tiny_image_processor(32).save_pretrained(root / "clip")
    tokenizer = tiny_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config("llama", vocab_size=len(tokenizer))))
    lm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})  # OpenFlamingo's order
    lm.resize_token_embeddings(len(tokenizer))
    model = convert_openflamingo.build_open_flamingo(
        tower, lm, media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"), cross_attn_every_n_layers=1,
        layers_path="model.layers")
    with torch.no_grad():  # as if trained: open gates, non-trivial norms and new embeddings
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.6)
            elif "norm" in name and (name.startswith("perceiver.") or "gated_cross_attn" in name):
                param.add_(0.1 * torch.randn_like(param))
        lm.get_input_embeddings().weight[-2:].normal_()
    # OpenFlamingo's training recipe and checkpoint: only what trains is saved (aliases included).
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = model.state_dict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            state.pop(name, None)
    assert not any(k.startswith("vision_encoder.") for k in state)
    torch.save(state, root / "checkpoint.pt")
    return model.eval(), tokenizer, root


@pytest.fixture(scope="module")
def converted(openflamingo, tmp_path_factory):
    _, _, root = openflamingo
    out = tmp_path_factory.mktemp("out") / "fusion"
    assert convert_openflamingo_script.main([
        "--checkpoint", str(root / "checkpoint.pt"), "--vision-tower", str(root / "clip"),
        "--language-model", str(root / "llama"), "--cross-attention-every-n-layers", "1", "--output", str(out)]) == 0
    return out


def test_logits_match_openflamingo_on_an_interleaved_two_image_prompt(openflamingo, converted):
    reference, tokenizer, _ = openflamingo
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(ours, FusionFlamingoForConditionalGeneration) and isinstance(processor, FusionFlamingoProcessor)
    prompt = "<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>"
    inputs = processor(images=[[random_image(5), random_image(6)]], text=[prompt], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], tokenizer([prompt], return_tensors="pt")["input_ids"])
    with torch.no_grad():
        expected = reference(vision_x=inputs["pixel_values"][None, :, None], lang_x=inputs["input_ids"],
                             attention_mask=inputs["attention_mask"]).logits
        logits = ours(**inputs).logits
        text_only = causal_lm_of(ours)(input_ids=inputs["input_ids"]).logits
    diff = (logits - expected).abs().max().item()
    print(f"OpenFlamingo parity: max |dlogit| = {diff:.2e} (images change the logits by "
          f"{(logits - text_only).abs().max().item():.2e})")
    assert diff <= reorder_bound(expected)
    assert (logits - text_only).abs().max() > 1e-2  # the comparison is not between two image-blind models


def test_conversion_rejects_wrong_cross_attention_placement(openflamingo, tmp_path, capsys):
    _, _, root = openflamingo
    assert convert_openflamingo.main([
        "--checkpoint", str(root / "checkpoint.pt"), "--vision-tower", str(root / "clip"),
        "--language-model", str(root / "llama"), "--cross-attention-every-n-layers", "2",
        "--output", str(tmp_path / "out")]) == 1
    assert "places them at [1]" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- invariants ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", LMS)
def test_fresh_model_gives_exactly_its_language_models_logits(text):
    model, processor = build(text, open_gates=False)
    blocks = model.gated_cross_attn_layers.values()
    assert all(b.attn_gate.item() == 0.0 == b.ff_gate.item() for b in blocks) and len(blocks) == 2
    # The reference: a pristine LM (no blocks, no hooks) with the same weights.
    lm = causal_lm_of(model)
    inputs = interleaved(processor)
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        fused = model(**inputs).logits
        alone = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   position_ids=position_ids).logits
    assert torch.equal(fused, alone)


@pytest.mark.parametrize("text", LMS)
def test_cached_and_uncached_greedy_generation_agree(text):
    model, processor = build(text)
    inputs = interleaved(processor)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False))


def test_media_keys_values_are_computed_once_per_generation_unless_disabled():
    model, processor = build(cross_attention_every_n_layers=1)
    inputs = interleaved(processor)
    calls = []
    for block in model.gated_cross_attn_layers.values():
        block.attn.to_kv.register_forward_hook(lambda *args: calls.append(1))
    tower_calls = []
    model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    reused = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert (len(calls), len(tower_calls)) == (len(model.gated_cross_attn_layers), 1)
    calls.clear()
    model.reuse_media_kv = False  # OpenFlamingo's behaviour: recompute every step
    recomputed = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert len(calls) == 5 * len(model.gated_cross_attn_layers) and torch.equal(reused, recomputed)


def test_left_padded_batch_and_beam_search_match_each_sample_alone():
    model, processor = build("gpt2")
    images = [[random_image(0), random_image(1)], [random_image(2)]]
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    for i, (prompt, sample_images) in enumerate(zip(PROMPTS, images)):
        alone = processor(images=[sample_images], text=[prompt], return_tensors="pt")
        assert torch.equal(greedy[i, -4:], model.generate(**alone, max_new_tokens=4, do_sample=False)[0, -4:])
        assert torch.equal(beams[i, -4:], model.generate(**alone, max_new_tokens=4, num_beams=3, do_sample=False)[0, -4:])


def test_text_attends_only_to_the_latest_image_and_nothing_before_the_first():
    model, processor = build()
    ids = processor(images=[[random_image(0), random_image(1)]], text=["a <image> b c <image> d"],
                    return_tensors="pt")["input_ids"]  # tokens: a, <image>, b, c, <image>, d
    cache = model.encode_media(torch.randn(2, 3, 32, 32), ids == processor.image_token_id)
    L = cache.latents_per_image
    allowed, no_media = model.model._media_masks(cache, ids == processor.image_token_id)
    first, second = [True] * L + [False] * L, [False] * L + [True] * L
    assert allowed[0].tolist() == [[False] * 2 * L, first, first, first, second, second]
    assert no_media[0].tolist() == [True, False, False, False, False, False]
    model.config.only_attend_immediate_media = False
    allowed, _ = model.model._media_masks(cache, ids == processor.image_token_id)
    assert allowed[0, 5].tolist() == [True] * 2 * L
    # End to end: the first token's logits do not depend on the images.
    model.config.only_attend_immediate_media = True
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32)).logits
        b = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert torch.equal(a[0, 0], b[0, 0]) and not torch.allclose(a[0, 2], b[0, 2])


def test_save_load_round_trip_processor_and_freezing(tmp_path):
    model, processor = build("opt", cross_attention_layers=[1], max_num_media=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(loaded.gated_cross_attn_layers) == ["1"] and loaded.config.media_token_id == processor.image_token_id
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    reloaded.tokenizer.padding_side = "left"
    inputs = interleaved(reloaded)
    assert torch.equal(inputs["input_ids"], reloaded.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]},
                {"role": "assistant", "content": "a circle"}]
    assert reloaded.apply_chat_template(messages) == "USER: <image>what is shown ?\nASSISTANT: a circle<|endofchunk|>\n"
    report = loaded.freeze_backbones(train_input_embeddings=True)
    assert report["vision_tower"] == 0 and report["perceiver"] > 0 and report["gated_cross_attn_layers"] > 0
    assert report["language_model"] == loaded.get_input_embeddings().weight.numel()


def test_errors():
    model, processor = build()
    inputs = interleaved(processor)
    with pytest.raises(ValueError, match=r"3 image tokens.*2 images"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:2])
    with pytest.raises(ValueError, match="cross_attention_layers"):
        FusionFlamingoConfig(text_config=tiny_text_config("llama"), cross_attention_layers=[5])
    with pytest.raises(ValueError, match="num_latents"):
        FusionFlamingoConfig(num_latents=0)

    class NoLayers(torch.nn.Module):
        config = copy.deepcopy(model.language_model.config)

    from vlm_fusion.modeling_flamingo import find_decoder_layers

    with pytest.raises(ValueError, match="decoder layers of NoLayers"):
        find_decoder_layers(NoLayers())


# ---- IDEFICS: a Flamingo with RMSNorm/SwiGLU blocks, vector gates, decoupled embeddings -----------------------------
@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    """A tiny transformers IdeficsForVisionText2Text (gates open, vector alphas, blocks before layers 0 and 2, two
    decoupled extra tokens) saved with its IdeficsProcessor."""
    return save_tiny_idefics(tmp_path_factory.mktemp("idefics"))


def test_idefics_converts_and_matches_transformers_with_several_images_per_sample(idefics_dir, tmp_path):
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor

    from vlm_fusion.conversion import convert_idefics

    out = tmp_path / "fusion"
    assert convert_idefics.main(["--input", str(idefics_dir), "--output", str(out)]) == 0
    reference = IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval()
    reference_processor = IdeficsProcessor.from_pretrained(idefics_dir)
    ours = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert ours.config.cross_attention_layers == [0, 2] and ours.config.gate_shape == "vector"
    assert "The blocks are IDEFICS'" in (out / "README.md").read_text()
    images = [random_image(i) for i in range(3)]
    samples = [["User:", images[0], images[1], "what is shown ?"], ["User:", images[2], "what colour is it ?"]]
    for sample in samples:  # each processor takes the interleaved sample as IDEFICS users write it
        mine = processor(text=[sample], return_tensors="pt")
        theirs = reference_processor(text=[sample], return_tensors="pt")
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
        with torch.no_grad():
            expected = reference(**theirs).logits
            diff = (ours(**mine).logits - expected).abs().max().item()
            text_only = causal_lm_of(ours)(input_ids=mine["input_ids"]).logits
        print(f"IDEFICS parity, {len(sample) - 2} image(s): max |dlogit| = {diff:.2e} (images move the logits by "
              f"{(ours(**mine).logits - text_only).abs().max().item():.2e})")
        assert diff <= reorder_bound(expected)
        ours_tokens = ours.generate(**mine, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours_tokens, reference.generate(**theirs, max_new_tokens=6, do_sample=False))
    # Both samples in one left-padded batch: two images and one.
    processor.tokenizer.padding_side = reference_processor.tokenizer.padding_side = "left"
    mine = processor(text=samples, padding=True, return_tensors="pt")
    theirs = reference_processor(text=samples, padding=True, return_tensors="pt")
    assert torch.equal(mine["input_ids"], theirs["input_ids"])
    assert_same_logits("IDEFICS parity, batch of 2 (2 images + 1 image, left padding)", ours, reference, mine, theirs)
    assert torch.equal(ours.generate(**mine, max_new_tokens=6, do_sample=False),
                       reference.generate(**theirs, max_new_tokens=6, do_sample=False))


def test_the_converted_idefics_processor_takes_idefics_processors_calls(idefics_dir, tmp_path):
    """A converted IDEFICS' processor is a drop-in for `IdeficsProcessor`: separate images and text, interleaved lists,
    one and several images per sample, a left-padded batch; same ids and mask, the same images (flat, without
    IDEFICS' padding images), and a chat template that writes IDEFICS' instruct layout."""
    from transformers import IdeficsProcessor

    from vlm_fusion import FusionIdeficsProcessor
    from vlm_fusion.conversion import convert_idefics

    out = tmp_path / "fusion"
    assert convert_idefics.main(["--input", str(idefics_dir), "--output", str(out)]) == 0
    processor, reference = AutoProcessor.from_pretrained(out), IdeficsProcessor.from_pretrained(idefics_dir)
    assert isinstance(processor, FusionIdeficsProcessor)
    a, b, c = (random_image(i) for i in range(3))

    def same(mine, theirs, images_per_sample):
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(mine[key], theirs[key]), key
        real = [theirs["pixel_values"][i, :n] for i, n in enumerate(images_per_sample)]  # IDEFICS pads with zeros
        assert torch.equal(mine["pixel_values"], torch.cat(real))

    same(processor(images=[[a, b]], text=["User: what is shown ?"]),
         reference(images=[[a, b]], text=["User: what is shown ?"]), [2])
    same(processor(images=[a], text="User: what is shown ?"), reference(images=[a], text="User: what is shown ?"), [1])
    sample = ["User:", a, "Describe.<end_of_utterance>", "\nAssistant:"]  # IDEFICS' interleaved form
    same(processor(text=[sample]), reference(text=[sample]), [1])
    processor.tokenizer.padding_side = reference.tokenizer.padding_side = "left"
    batch = [["User:", a, b, "what is shown ?"], ["User:", c, "what colour is it ?<end_of_utterance>", "\nAssistant:"]]
    same(processor(text=batch), reference(text=batch), [2, 1])
    same(processor(images=[[a, b], [c]], text=["User: both ?", "User: one ?"]),
         reference(images=[[a, b], [c]], text=["User: both ?", "User: one ?"]), [2, 1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "User:<image>Describe.<end_of_utterance>\nAssistant:"
    same(processor(images=[a], text=[prompt]), reference(text=[["User:", a, "Describe.<end_of_utterance>\nAssistant:"]]),
         [1])
