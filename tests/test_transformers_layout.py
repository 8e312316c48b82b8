"""The transformers 5 VLM layout: a headless `Fusion*Model` inside `Fusion*ForConditionalGeneration`, behaving as
transformers' own VLMs do where tools built on transformers (TRL, vLLM's Transformers backend, the common model
tests) rely on it."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForImageTextToText,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import (causal_lm_of, causal_lm_state_dict, changed_weights, dynamic_static_and_compiled, random_image,
                      reorder_bound)
from vlm_fusion import FAMILIES, FusionLlavaConfig, FusionLlavaForConditionalGeneration
from vlm_fusion.tools.tiny import tiny_model_and_processor, tiny_text_config, tiny_vision_config

SMALL = {
    "fusion_llava": {},
    "fusion_blip2": {},
    "fusion_flamingo": dict(num_latents=4, perceiver_depth=1),
}
PROMPT = "<image> what is shown ?"


def build(family, text="llama", **kwargs):
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor(family, "clip", text, **{**SMALL[family], **kwargs})
    if family == "fusion_flamingo":  # open the gates, so that the images matter
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.4)
    return model, processor


def inputs_for(processor, prompt=PROMPT, n_images=1):
    return processor(images=[random_image(i) for i in range(n_images)], text=[prompt], return_tensors="pt")


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    model, processor = build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return request.param, path, model, processor


# ---- the layout ------------------------------------------------------------------------------------------------
def test_llava_state_dict_is_transformers_llavas_and_its_weights_give_the_same_logits():
    vision, text = tiny_vision_config("clip"), tiny_text_config("llama", vocab_size=128)
    reference = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=127,
                                                          vision_feature_layer=-2)).eval()
    ours = FusionLlavaForConditionalGeneration(FusionLlavaConfig(vision_config=vision, text_config=text,
                                                                 image_token_id=127)).eval()
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    input_ids = torch.tensor([[1, 5, *[127] * 16, 9, 11]])
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        logits = ours(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (logits - expected).abs().max() <= reorder_bound(expected)


@pytest.mark.parametrize("text", ["llama", "gpt2", "opt"])
def test_auto_model_is_headless_and_feeds_lm_head_to_the_same_logits(saved, text, tmp_path):
    family, path, model, processor = saved
    if text != "llama":
        model, processor = build(family, text)
        path = tmp_path
        model.save_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    assert type(base) is FAMILIES[family].base_model and not hasattr(base, "lm_head")
    assert type(base.language_model) is type(model.language_model)  # the LM's base decoder, not its *ForCausalLM
    assert model.base_model is model.model and model.get_decoder() is model.model
    inputs = inputs_for(processor)
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        assert torch.equal(model.lm_head(hidden), model(**inputs).logits)
    if text == "gpt2":  # tied through GPT-2's own `wte`
        assert model.lm_head.weight is model.language_model.wte.weight


def test_checkpoints_of_the_previous_layout_load_and_resave_in_the_new_one(saved, tmp_path):
    family, path, model, processor = saved
    state = load_file(path / "model.safetensors")
    assert all(k.startswith(("model.", "lm_head.")) for k in state)
    # vlm-fusion < 0.2: the whole causal LM under `language_model`, the tower and bridge at the top level.
    old = {f"language_model.{k}": v for k, v in causal_lm_state_dict(model).items()}
    old.update({k.removeprefix("model."): v for k, v in model.state_dict().items()
                if not k.startswith(("model.language_model.", "lm_head."))})
    old.update({f"language_model.model.{k.removeprefix('model.language_model.')}": v
                for k, v in model.state_dict().items() if "gated_cross_attn_layer" in k})
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not changed_weights(model, loaded.state_dict())
    loaded.save_pretrained(tmp_path / "new")
    assert load_file(tmp_path / "new" / "model.safetensors").keys() == state.keys()


# ---- what transformers' common tests exercise ------------------------------------------------------------------
def test_assisted_generation_gives_the_greedy_tokens(saved):
    family, path, model, processor = saved
    inputs = inputs_for(processor)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=copy.deepcopy(model))
    assert torch.equal(assisted, expected)


def test_inputs_embeds_with_pixel_values():
    for family in ("fusion_llava", "fusion_flamingo"):
        model, processor = build(family)
        inputs = inputs_for(processor)
        ids = inputs["input_ids"]
        if family == "fusion_llava":  # a placeholder outside the vocabulary cannot be found in embeddings
            with pytest.raises(ValueError, match="pass `input_ids`"):
                model(inputs_embeds=torch.zeros(*ids.shape, 64), pixel_values=inputs["pixel_values"])
            model.resize_token_embeddings(model.config.image_token_id + 1)
        embeds = model.get_input_embeddings()(ids)
        with torch.no_grad():
            expected = model(**inputs).logits
            logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"]).logits
        assert torch.equal(logits, expected), family
        generated = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                   pixel_values=inputs["pixel_values"], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, ids.shape[1]:])



@pytest.mark.parametrize("family", list(FAMILIES))
def test_beam_search_from_inputs_embeds_shares_the_images_out_as_from_input_ids(family):
    """`generate(inputs_embeds=..., pixel_values=..., num_beams=2)`: the images follow their sample's beams, found
    through the placeholders' embeddings (there are no `input_ids` to count them in)."""
    model, processor = build(family)
    model.resize_token_embeddings(max(model.config.image_token_id + 1, model.config.text_config.vocab_size))
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(0), random_image(1)], text=[PROMPT, "<image> what colour ?"],
                       padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=2)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    generated = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], **extra, **settings)
    expected = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(generated, expected)


def test_output_loading_info(saved):
    family, path, model, processor = saved
    loaded, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


def test_get_image_features_returns_the_tower_outputs_and_the_visual_tokens(saved):
    family, path, model, processor = saved
    pixel_values = inputs_for(processor)["pixel_values"]
    out = model.get_image_features(pixel_values, output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape[:2] == (1, model.config.num_image_tokens() if family != "fusion_flamingo" else 4)
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert model.get_image_features(pixel_values).hidden_states is None
    # Set on the configs, as `from_pretrained(..., output_attentions=True)` does: the tower's default, as for the tower.
    configured = copy.deepcopy(model)
    configured.set_attn_implementation("eager")
    for config in (configured.config, configured.config.vision_config, configured.config.text_config):
        config.output_hidden_states = config.output_attentions = True
    from_config = configured.get_image_features(pixel_values)
    assert len(from_config.hidden_states) == len(from_config.attentions) + 1 == model.config.vision_config.num_hidden_layers + 1
    as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)
    with torch.no_grad():
        assert torch.equal(model(**inputs_for(processor)).image_hidden_states, out.pooler_output)


def test_return_dict_false_gives_tuples(saved):
    family, path, model, processor = saved
    inputs = inputs_for(processor)
    with torch.no_grad():
        full = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)
    assert isinstance(base, tuple) and base[0].shape[:2] == full.logits.shape[:2]


def test_vocab_size_follows_resize_token_embeddings(saved):
    family, path, model, processor = saved
    model = copy.deepcopy(model)
    model.resize_token_embeddings(model.config.text_config.vocab_size + 8)
    assert model.vocab_size == model.config.text_config.vocab_size == model.lm_head.weight.shape[0]


def test_attn_implementation_per_backbone(saved):
    family, path, model, processor = saved
    loaded = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation={"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}
    )
    assert loaded.language_model.config._attn_implementation == "eager"
    assert loaded.vision_tower.config._attn_implementation == "sdpa"


def test_flamingo_gates_missing_from_a_checkpoint_start_at_zero(tmp_path):
    model, processor = build("fusion_flamingo")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith(("attn_gate", "ff_gate"))},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert all(b.attn_gate.item() == 0.0 == b.ff_gate.item() for b in loaded.gated_cross_attn_layers.values())
    inputs = inputs_for(processor)
    with torch.no_grad():  # closed gates: exactly the language model
        assert torch.equal(loaded(**inputs).logits, causal_lm_of(loaded)(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).logits)


def test_a_vision_tower_missing_from_a_checkpoint_gets_its_own_initialisation(tmp_path):
    model, _ = build("fusion_llava")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "vision_tower" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    stds = [torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in tower.encoder.layers]).std().item()
            for tower in (loaded.vision_tower, CLIPVisionModel(loaded.config.vision_config))]
    print(f"missing CLIP tower: q_proj std {stds[0]:.4f}, CLIP's own initialisation {stds[1]:.4f}")
    assert abs(stds[0] - stds[1]) < 0.15 * stds[1]  # CLIP's scheme is ~0.0625 here, the generic one 0.02


# ---- attention plugged in from outside (how vLLM's Transformers backend runs its own attention) ---------------
def test_a_registered_attention_function_runs_every_language_model_attention(saved):
    family, path, model, processor = saved
    calls = []

    def recording(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("vlm_fusion_recording", recording)
    inputs = inputs_for(processor)
    recorded = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="vlm_fusion_recording").eval()
    reference = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits, expected = recorded(**inputs).logits, reference(**inputs).logits
    assert calls.count("LlamaAttention") == model.config.text_config.num_hidden_layers
    assert torch.equal(logits, expected)


# ---- static cache and torch.compile ------------------------------------------------------------------------------
# compiling takes the most time of the default run: one family there, the other two with `-m slow` (in CI)
@pytest.mark.parametrize("family", ["fusion_llava", pytest.param("fusion_blip2", marks=pytest.mark.slow),
                                    pytest.param("fusion_flamingo", marks=pytest.mark.slow)])
def test_static_cache_and_compiled_decoding_give_the_dynamic_caches_tokens(family):
    model, processor = build(family)
    assert type(model)._can_compile_fullgraph
    processor.tokenizer.padding_side = "left"
    n = 1 if family != "fusion_flamingo" else 2
    prompts = [PROMPT, "<image> what colour is the circle ?"] if n == 1 else ["<image> a <image> b", "<image> c <image> d e"]
    inputs = processor(images=[random_image(i) for i in range(2 * n)], text=prompts, padding=True, return_tensors="pt")
    dynamic, static, compiled = dynamic_static_and_compiled(model, inputs, max_new_tokens=6)
    assert torch.equal(static, dynamic) and torch.equal(compiled, dynamic)


# ---- the LM's own head -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_config", [
    {"model_type": "gemma2", "final_logit_softcapping": 0.5, "head_dim": 16},
    {"model_type": "cohere", "logit_scale": 3.0},
    {"model_type": "granite", "logits_scaling": 0.25},
])
def test_the_lm_heads_own_logit_handling_survives_the_split(text_config):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    config = FusionLlavaConfig(vision_config=tiny_vision_config("clip"), text_config={**common, **text_config},
                               image_token_id=64)
    torch.manual_seed(0)
    model = FusionLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)  # logits large enough for a cap or scale to show
    ids = torch.tensor([[1, 5, 9, 11, 20]])
    with torch.no_grad():
        expected = causal_lm_of(model)(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert not torch.allclose(model.lm_head(model.model(input_ids=ids).last_hidden_state), expected)


def test_an_lm_head_with_unknown_logit_handling_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

    class OddConfig(LlamaConfig):
        model_type = "vlm_fusion_test_odd"

    class OddModel(LlamaModel):
        config_class = OddConfig

    class OddForCausalLM(LlamaForCausalLM):
        config_class = OddConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + self.config.logit_bias  # something vlm-fusion does not reproduce
            return out

    AutoConfig.register(OddConfig.model_type, OddConfig, exist_ok=True)
    AutoModelForCausalLM.register(OddConfig, OddForCausalLM, exist_ok=True)
    AutoModel.register(OddConfig, OddModel, exist_ok=True)
    config = FusionLlavaConfig(vision_config=tiny_vision_config("clip"),
                               text_config={**tiny_text_config("llama"), "model_type": OddConfig.model_type})
    with pytest.raises(ValueError, match=r"OddForCausalLM's head uses \['logit_bias'\]"):
        FusionLlavaForConditionalGeneration(config)


# ---- generating past the LM's context ----------------------------------------------------------------------------
def test_generating_past_learned_positions_stops_with_a_clear_error_and_past_rope_warns(caplog):
    model, processor = build("fusion_llava", text="gpt2")  # 512 learned positions
    inputs = inputs_for(processor)
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"reach position {length + 600}, past the 512 positions .*gpt2"):
        model.generate(**inputs, max_new_tokens=600, do_sample=False)
    assert model.generate(**inputs, max_new_tokens=512 - length, min_new_tokens=512 - length).shape[1] == 512
    model, processor = build("fusion_llava", text="llama")
    model.config.text_config.max_position_embeddings = length + 2  # rotary: runs, with a warning
    with caplog.at_level("WARNING"):
        out = model.generate(**inputs_for(processor), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == length + 4 and "was not trained that far" in caplog.text


def test_the_base_model_built_from_config_runs_a_registered_attention_with_threaded_kwargs(saved):
    """What vLLM's Transformers backend does: `AutoModel.from_config(config, attn_implementation=...)`, its own head,
    and its own keyword arguments handed through `forward` to every attention call."""
    family, path, model, processor = saved
    calls = []

    def recording(module, *args, **kwargs):
        calls.append((type(module).__name__, kwargs.get("vlm_fusion_marker")))
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("vlm_fusion_threaded", recording)
    base = AutoModel.from_config(copy.deepcopy(model.config), attn_implementation="vlm_fusion_threaded").eval()
    assert type(base) is FAMILIES[family].base_model
    base.load_state_dict(model.model.state_dict())
    inputs = inputs_for(processor)
    with torch.no_grad():
        hidden = base(**inputs, vlm_fusion_marker="from the caller").last_hidden_state
        assert torch.equal(model.lm_head(hidden), model(**inputs).logits)
    lm_calls = [marker for name, marker in calls if name == "LlamaAttention"]
    assert lm_calls == ["from the caller"] * model.config.text_config.num_hidden_layers
