"""`vlm-fusion explain`: the maps against direct computations (transformers' own Blip2 for BLIP-2), their invariants,
the pictures and the page in a real browser, and bad input in one line."""

import math
import shutil

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from conftest import ROOT, assert_reordered, random_image
from test_blip2 import blip2_hf_dir, converted  # noqa: F401  (fixtures: a tiny transformers BLIP-2, converted)
from test_flamingo import build as build_flamingo
from vlm_fusion import FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.explain import ExplainError, explain
from vlm_fusion.explain.render import write
from vlm_fusion.tools.tiny import tiny_model_and_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config
from vlm_fusion_cli import main

PROMPT = "what is this ? <image> a"


def image_positions(input_ids, image_token_id):
    return (input_ids[0] == image_token_id).nonzero().flatten()


# ---- the maps equal a direct computation -------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_maps_are_the_lms_attention_at_each_decoding_step(strategy):
    """Each token's raw map is the attention of the step that generated it (transformers' `generate` with
    `output_attentions`, KV cache on) at the image's patch positions; the maps sum to one over the image."""
    model, processor = tiny_model_and_processor("fusion_llava", vision_feature_select_strategy=strategy)
    image = random_image(0)
    result = explain(model, processor, [image], PROMPT, max_new_tokens=5)
    assert model.config.text_config._attn_implementation == "sdpa"  # switched back after the call
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == result.token_ids
    positions = image_positions(inputs["input_ids"], model.config.image_token_id)
    prefix = 1 if strategy == "full" else 0  # CLS
    assert len(positions) == 16 + prefix
    for step, attentions in enumerate(out.attentions):  # per step: per layer (1, H, queries, keys)
        expected = torch.stack([layer[0, :, -1, positions[prefix:]] for layer in attentions])  # (L, H, 16)
        assert_reordered(result.layer_maps[0][step].reshape(*expected.shape), expected)
        assert_reordered(result.image_share[step, ..., 0],
                         torch.stack([layer[0, :, -1, positions] for layer in attentions]).sum(-1))
    maps = result.maps()[0]
    assert maps.shape == (len(result.tokens), 4, 4)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(len(result.tokens)))
    one = result.maps(layers=[1], heads=[0])[0]
    torch.testing.assert_close(one, result.layer_maps[0][:, 1, 0] / result.layer_maps[0][:, 1, 0].sum((-1, -2))[:, None, None])


def test_llava_two_images_each_get_their_own_positions():
    model, processor = tiny_model_and_processor("fusion_llava")
    prompt = "<image> a <image> what is this ?"
    result = explain(model, processor, [random_image(0), random_image(1)], prompt, max_new_tokens=3)
    model.set_attn_implementation("eager")
    inputs = processor(images=[random_image(0), random_image(1)], text=[prompt], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([result.token_ids])], 1)
    with torch.no_grad():
        out = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, output_attentions=True)
    positions = image_positions(inputs["input_ids"], model.config.image_token_id)
    row = inputs["input_ids"].shape[1] - 1
    for image, run in enumerate(positions.split(16)):
        expected = torch.stack([layer[0, :, row, run] for layer in out.attentions])  # first token (L, H, 16)
        assert_reordered(result.layer_maps[image][0].reshape(expected.shape), expected)


def test_anyres_maps_have_the_images_aspect_ratio():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    grids = [[32, 64], [64, 32], [64, 64]]
    config = FusionLlavaConfig(vision_config=tiny_vision_config("clip"), text_config=tiny_text_config("llama", vocab_size=58),
                               image_token_id=58, image_grid_pinpoints=grids)
    model = FusionLlavaForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=grids)
    processor = FusionLlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=8)
    for height, width in [(40, 80), (80, 40)]:
        result = explain(model, processor, [random_image(0, size=(height, width))], PROMPT, max_new_tokens=2)
        maps = result.maps()[0]
        assert maps.shape[1] / maps.shape[2] == height / width
        assert result.regions[0] == (0, 0, width, height)  # the whole image: anyres pads, then unpads
        torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(len(result.tokens)))
    for method in ("relevance", "occlusion"):  # not yet: said before anything runs
        with pytest.raises(ExplainError, match=f"method '{method}' does not .* anyres tiles") as error:
            explain(model, processor, [random_image(0, size=(40, 80))], PROMPT, method=method)
        assert len(str(error.value).splitlines()) == 1


def test_blip2_maps_equal_transformers_blip2_attentions_pushed_through_the_qformer(blip2_hf_dir, converted):  # noqa: F811
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    image, prompt = random_image(3), "Question: what is shown ? Answer:"
    result = explain(ours, processor, [image], prompt, max_new_tokens=4)
    reference = Blip2ForConditionalGeneration.from_pretrained(blip2_hf_dir, attn_implementation="eager").eval()
    inputs = Blip2Processor.from_pretrained(blip2_hf_dir)(images=image, text=prompt, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([result.token_ids])], 1)
    with torch.no_grad():
        out = reference(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=torch.ones_like(ids),
                        output_attentions=True)
        vision = reference.vision_model(inputs["pixel_values"]).last_hidden_state  # (1, 1 + 16, D_v)
        qformer = reference.qformer(query_embeds=reference.query_tokens, encoder_hidden_states=vision,
                                    output_attentions=True)
    cross = torch.stack([a[0] for a in qformer.cross_attentions])  # (C, H, Q, 1 + 16)
    reads = cross.mean((0, 1))[:, 1:]  # over cross layers and heads, CLS out
    reads = reads / reads.sum(-1, keepdim=True)
    queries = image_positions(inputs["input_ids"], reference.config.image_token_index)
    rows = torch.arange(len(result.tokens)) + inputs["input_ids"].shape[1] - 1
    lm = torch.stack([a[0][:, rows][..., queries] for a in out.language_model_outputs.attentions])  # (L, H, T, Q)
    expected = (lm.permute(2, 0, 1, 3) @ reads).reshape(result.layer_maps[0].shape)  # (T, L, H, 4, 4)
    assert_reordered(result.layer_maps[0], expected)
    torch.testing.assert_close(result.maps()[0].sum((-1, -2)), torch.ones(len(result.tokens)))


def flamingo_reference(model, inputs, ids, rows):
    """Per token, gated block and head, the map computed from the weights: the resampler's latent-over-patch
    attention (mean over layers and heads) under each block's softmax over the image's latents."""
    inner = model.model
    features = inner.get_vision_features(inputs["pixel_values"])[0]  # (1, 16, D_v)
    latents, reads = inner.perceiver.latents[None], []
    for layer in inner.perceiver.layers:
        attn = layer.attn
        media, lat = attn.norm_media(features), attn.norm_latents(latents)
        q = attn.to_q(lat).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_kv(torch.cat([media, lat], 1)).chunk(2, -1)[0].unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)[..., : features.shape[1]]
        reads.append(weights / weights.sum(-1, keepdim=True))
        latents = layer(features, latents)
    reads = torch.stack(reads).mean((0, 2))[0]  # (L_lat, 16)
    media = inner.perceiver(features, torch.zeros(1, dtype=torch.long))  # (1, L_lat, D_v)
    entering = {}
    hooks = [block.register_forward_pre_hook(lambda m, args, i=i: entering.__setitem__(i, args[0]))
             for i, block in inner.gated_cross_attn_layers.items()]
    with torch.no_grad():
        model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for hook in hooks:
        hook.remove()
    maps = []
    for i, block in inner.gated_cross_attn_layers.items():
        attn = block.attn
        q = attn.to_q(attn.norm(entering[i][0, rows])).unflatten(-1, (attn.heads, -1)).transpose(0, 1)  # (H, T, d)
        k = attn.to_kv(media[0]).chunk(2, -1)[0].unflatten(-1, (attn.heads, -1)).transpose(0, 1)  # (H, L_lat, d)
        over_latents = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # (H, T, L_lat)
        maps.append(over_latents @ reads)  # (H, T, 16)
    return torch.stack(maps).permute(2, 0, 1, 3)  # (T, blocks, H, 16)


def test_flamingo_maps_equal_a_direct_computation_and_are_weighted_by_the_gates():
    model, processor = build_flamingo()
    image, prompt = random_image(0), "<image>a red circle"
    result = explain(model, processor, [image], prompt, max_new_tokens=4)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([result.token_ids])], 1)
    rows = torch.arange(len(result.tokens)) + inputs["input_ids"].shape[1] - 1
    with torch.no_grad():
        expected = flamingo_reference(model, inputs, ids, rows)
    assert_reordered(result.layer_maps[0].flatten(-2), expected)
    gates = {i: math.tanh(0.8) for i in model.gated_cross_attn_layers}
    assert result.gates == pytest.approx(gates)
    assert_reordered(result.maps()[0], math.tanh(0.8) * expected.mean((1, 2)).unflatten(-1, (4, 4)))


def test_flamingo_with_gates_at_zero_shows_nothing():
    model, processor = build_flamingo(open_gates=False)
    result = explain(model, processor, [random_image(0)], "<image>a red circle", max_new_tokens=3)
    assert result.layer_maps[0].abs().sum() > 0  # the blocks still attend; their gates shut them
    assert all(value == 0 for value in result.gates.values())
    assert torch.equal(result.maps()[0], torch.zeros_like(result.maps()[0]))


def test_flamingo_text_after_the_second_image_looks_only_at_it():
    model, processor = build_flamingo()
    result = explain(model, processor, [random_image(0), random_image(1)], "<image>a red<|endofchunk|><image>a",
                     max_new_tokens=3)
    share = result.image_share  # (T, blocks, H, images): the answer follows the second image only
    assert torch.equal(share[..., 0], torch.zeros_like(share[..., 0]))
    torch.testing.assert_close(share[..., 1], torch.ones_like(share[..., 1]))
    assert result.maps()[0].abs().sum() == 0 and result.maps()[1].abs().sum() > 0


# ---- relevance: the paper's rules on attention and gradients read directly ---------------------------------------
def recorded_attention(model, inputs, rows, token_ids):
    """Every attention of one forward pass (tower, bridge, LM: all SDPA, swapped for a softmax we keep), in call
    order, and per answer token each one's gradient by plain `.backward()` of the token's logit."""
    record = []

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = scores.softmax(-1)
        probs.retain_grad()
        record.append(probs)
        return probs @ v

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        logits = model(**inputs).logits[0]
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    grads = []
    for row, token in zip(rows.tolist(), token_ids):
        for probs in record:
            probs.grad = None
        logits[row, token].backward(retain_graph=True)
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in record])
    return [p.detach() for p in record], grads


def cam(probs, grad):  # eq. 5: E_h[(grad * A)+], (H, n, m) -> (n, m)
    return (grad * probs).clamp(min=0).mean(0)


def r_bar(r):  # eq. 8-9: identity out, rows normalised (a zero row stays zero), identity back
    eye = torch.eye(len(r))
    hat = r - eye
    total = hat.sum(-1, keepdim=True)
    return hat / torch.where(total > 0, total, torch.ones_like(total)) + eye


def tower_rule(probs, grads, image):
    r = torch.eye(probs[0].shape[-1])
    for a, g in zip(probs, grads):
        r = r + cam(a[image], g[image]) @ r
    return r


def full_inputs(processor, images, prompt, token_ids):
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([token_ids])], 1)
    rows = torch.arange(len(token_ids)) + inputs["input_ids"].shape[1] - 1
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, rows


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_relevance_is_the_papers_self_attention_rule_through_the_lm_then_the_tower(strategy):
    """Chefer et al. 2021 on LLaVA: R = I, R += Ā·R per layer over the LM's sequence; the token's row at the image's
    positions, times the tower's own R (its prefix token dropped), is the map."""
    model, processor = tiny_model_and_processor("fusion_llava", vision_feature_select_strategy=strategy)
    images = [random_image(0), random_image(1)]
    prompt = "<image> a <image> what is this ?"
    result = explain(model, processor, images, prompt, method="relevance", max_new_tokens=3)
    inputs, rows = full_inputs(processor, images, prompt, result.token_ids)
    probs, grads = recorded_attention(model, inputs, rows, result.token_ids)
    tower_layers = model.config.vision_config.num_hidden_layers
    assert len(probs) == tower_layers + model.config.text_config.num_hidden_layers
    positions = image_positions(inputs["input_ids"], model.config.image_token_id).split(len(images) * [16 + (strategy == "full")])
    for t, row in enumerate(rows.tolist()):
        r = torch.eye(inputs["input_ids"].shape[1])
        for a, g in zip(probs[tower_layers:], grads[t][tower_layers:]):
            r = r + cam(a[0], g[0]) @ r
        for image, run in enumerate(positions):
            tower = tower_rule(probs[:tower_layers], grads[t][:tower_layers], image)  # (17, 17): CLS, then 16 patches
            expected = (r[row, run] @ tower[-len(run):])[1:].reshape(4, 4)
            assert_reordered(result.maps()[image][t], expected)
    assert result.maps()[0].abs().sum() > 0 and result.layers == ["all"]


def test_blip2_relevance_follows_the_qformers_self_and_cross_attention_rules():
    """BLIP-2: the LM's R at the query positions, times the Q-Former's R_qi (per layer: R_qq += Ā·R_qq and
    R_qi += Ā·R_qi over the queries, then R_qi += R̄_qqᵀ·Ā over the image), times the tower's R."""
    model, processor = tiny_model_and_processor("fusion_blip2")
    image, prompt = random_image(2), "what is this ? <image> a"
    result = explain(model, processor, [image], prompt, method="relevance", max_new_tokens=3)
    inputs, rows = full_inputs(processor, [image], prompt, result.token_ids)
    probs, grads = recorded_attention(model, inputs, rows, result.token_ids)
    tower_layers = model.config.vision_config.num_hidden_layers
    qformer = [("cross" if i % 2 else "self") for i in range(2 * model.config.qformer_num_hidden_layers)]
    qformer = [kind for index, kind in enumerate(qformer)
               if kind == "self" or (index // 2) % model.config.cross_attention_frequency == 0]
    assert len(probs) == tower_layers + len(qformer) + model.config.text_config.num_hidden_layers
    queries = image_positions(inputs["input_ids"], model.config.image_token_id)
    Q = model.config.num_query_tokens
    for t, row in enumerate(rows.tolist()):
        g = grads[t]
        tower = tower_rule(probs[:tower_layers], g[:tower_layers], 0)
        r_qq, r_qi = torch.eye(Q), torch.zeros(Q, tower.shape[0] - (model.config.vision_feature_select_strategy == "default"))
        for kind, a, ga in zip(qformer, probs[tower_layers:], g[tower_layers:]):
            c = cam(a[0], ga[0])
            if kind == "self":
                r_qq, r_qi = r_qq + c @ r_qq, r_qi + c @ r_qi
            else:
                r_qi = r_qi + r_bar(r_qq).T @ c
        r = torch.eye(inputs["input_ids"].shape[1])
        for a, ga in zip(probs[tower_layers + len(qformer):], g[tower_layers + len(qformer):]):
            r = r + cam(a[0], ga[0]) @ r
        on_features = r[row, queries] @ r_qi
        expected = (on_features @ tower[-len(on_features):])[1:].reshape(4, 4)
        assert_reordered(result.maps()[0][t], expected)
    assert result.maps()[0].abs().sum() > 0


@pytest.mark.parametrize("open_gates", [True, False])
def test_flamingo_relevance_follows_the_resampler_and_gated_cross_attention_rules(open_gates):
    """Flamingo: the resampler's one softmax over [media; latents] split into its cross part (R_li += R̄_llᵀ·Ā) and
    its self part (R_ll += Ā·R_ll, R_li += Ā·R_li); in the LM, each gated block R_tl += R̄_ttᵀ·Ā, each decoder layer
    R_tt += Ā·R_tt, R_tl += Ā·R_tl. The gate is in the gradient: shut gates give no relevance at all."""
    model, processor = build_flamingo(open_gates=open_gates)
    image, prompt = random_image(0), "<image>a red circle"
    result = explain(model, processor, [image], prompt, method="relevance", max_new_tokens=3)
    if not open_gates:
        assert torch.equal(result.maps()[0], torch.zeros_like(result.maps()[0]))
        return
    inputs, rows = full_inputs(processor, [image], prompt, result.token_ids)
    probs, grads = recorded_attention(model, inputs, rows, result.token_ids)
    tower_layers, depth = model.config.vision_config.num_hidden_layers, model.config.perceiver_depth
    gated = {int(i) for i in model.gated_cross_attn_layers}
    lm_kinds = [kind for i in range(model.config.text_config.num_hidden_layers)
                for kind in (["gated"] if i in gated else []) + ["self"]]
    assert len(probs) == tower_layers + depth + len(lm_kinds)
    L = model.config.num_latents
    for t, row in enumerate(rows.tolist()):
        g = grads[t]
        tower = tower_rule(probs[:tower_layers], g[:tower_layers], 0)
        V = tower.shape[0] - 1  # the default strategy: the patches, CLS out
        r_ll, r_li = torch.eye(L), torch.zeros(L, V)
        for a, ga in zip(probs[tower_layers : tower_layers + depth], g[tower_layers : tower_layers + depth]):
            c = cam(a[0], ga[0])  # (L, V + L)
            r_ll, r_li = r_ll + c[:, V:] @ r_ll, r_li + c[:, V:] @ r_li + r_bar(r_ll).T @ c[:, :V]
        S = inputs["input_ids"].shape[1]
        r_tt, r_tl = torch.eye(S), torch.zeros(S, L)
        for kind, a, ga in zip(lm_kinds, probs[tower_layers + depth :], g[tower_layers + depth :]):
            c = cam(a[0], ga[0])
            if kind == "gated":
                r_tl = r_tl + r_bar(r_tt).T @ c
            else:
                r_tt, r_tl = r_tt + c @ r_tt, r_tl + c @ r_tl
        expected = (r_tl[row] @ r_li @ tower[1:])[1:].reshape(4, 4)
        assert_reordered(result.maps()[0][t], expected)
    assert result.maps()[0].abs().sum() > 0


# ---- occlusion: a batched loop equals one masked image at a time ------------------------------------------------
@pytest.mark.parametrize("family", ["fusion_llava", "fusion_blip2", "fusion_flamingo"])
@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_occlusion_equals_a_loop_of_one_masked_image_at_a_time(family, baseline):
    from vlm_fusion.explain.occlusion import baseline_pixels

    model, processor = build_flamingo() if family == "fusion_flamingo" else tiny_model_and_processor(family)
    images = [random_image(0), random_image(1)]
    prompt = "<image>a red<|endofchunk|><image>a" if family == "fusion_flamingo" else "<image> a <image> what is this ?"
    if family == "fusion_blip2":
        images, prompt = images[:1], "what is this ? <image> a"
    result = explain(model, processor, images, prompt, method="occlusion", baseline=baseline, grid=(2, 3),
                     batch_size=4, max_new_tokens=3)
    inputs, rows = full_inputs(processor, images, prompt, result.token_ids)
    pixels = inputs["pixel_values"]
    fill = baseline_pixels(pixels, baseline)

    def logprobs(pixel_values):  # as log-odds: log p - log(1 - p), 1 - p summed over the other tokens
        with torch.no_grad():
            logits = model(**{**inputs, "pixel_values": pixel_values}).logits[0, rows].double()
        logp = logits.log_softmax(-1)
        chosen = logp[torch.arange(len(rows)), result.token_ids]
        others = torch.stack([torch.cat([row[:token], row[token + 1 :]]).logsumexp(0)
                              for row, token in zip(logp, result.token_ids)])
        return (chosen - others).float()

    reference = logprobs(pixels)
    Y, X = pixels.shape[-2:]
    for image in range(len(images)):
        assert result.maps()[image].shape == (len(result.tokens), 2, 3)
        for r in range(2):
            for c in range(3):
                masked = pixels.clone()
                ys, xs = slice(r * Y // 2, (r + 1) * Y // 2), slice(c * X // 3, (c + 1) * X // 3)
                masked[image, :, ys, xs] = fill[image, :, ys, xs]
                assert_reordered(result.maps()[image][:, r, c], reference - logprobs(masked))


def test_the_baselines_mean_colour_blur_and_background():
    from vlm_fusion.explain.occlusion import baseline_pixels

    pixels = torch.rand(2, 3, 12, 16)
    torch.testing.assert_close(baseline_pixels(pixels, "mean")[:, :, 5, 7], pixels.mean((-1, -2)))
    flat = torch.full((1, 3, 12, 16), 0.25)
    assert_reordered(baseline_pixels(flat, "blur"), flat)
    scene = torch.rand(1, 3, 12, 16)
    scene[..., 4:, :] = torch.tensor([0.9, 0.8, 0.7])[:, None, None]  # two thirds of the image one colour
    assert torch.equal(baseline_pixels(scene, "background")[0, :, 0, 0], torch.tensor([0.9, 0.8, 0.7]))


# ---- faithfulness: pointing and deletion / insertion AUC against brute force ---------------------------------------
def test_pointing_and_deletion_insertion_auc_equal_brute_force():
    """`evaluate` against a plain loop: the peak cell found cell by cell, its centre tested against the target; each
    step of deletion and insertion as its own masked image, the token's probability by softmax, the trapezoids
    summed by hand."""
    from vlm_fusion.explain.faithfulness import Item, evaluate
    from vlm_fusion.explain.occlusion import baseline_pixels

    model, processor = tiny_model_and_processor("fusion_llava")
    items = [Item(image=random_image(i), prompt=PROMPT, target=target, objects=[target, (0, 0, 48, 20)])
             for i, target in enumerate([(0, 0, 24, 20), (24, 20, 48, 40), (12, 10, 36, 30)])]
    methods = ["relevance", "occlusion", "attention"]
    report = evaluate(model, processor, items, methods, baseline="mean", random_orders=1)
    expected = {m: {"pointing": 0.0, "deletion": 0.0, "insertion": 0.0} for m in methods}
    cell_chance = 0.0
    for item in items:
        first = explain(model, processor, [item.image], item.prompt, method="relevance")
        inputs, rows = full_inputs(processor, [item.image], item.prompt, first.token_ids)
        pixels = inputs["pixel_values"]
        fill = baseline_pixels(pixels, "mean")
        Y, X = pixels.shape[-2:]
        left, top, right, bottom = first.regions[0]

        def centre(r, c, h, w):
            return left + (c + 0.5) * (right - left) / w, top + (r + 0.5) * (bottom - top) / h

        def probability(pixel_values):
            with torch.no_grad():
                logits = model(**{**inputs, "pixel_values": pixel_values}).logits[0, rows[0]]
            return float(logits.softmax(-1)[first.token_ids[0]])

        for method in methods:
            heat = explain(model, processor, [item.image], item.prompt, method=method,
                           token_ids=first.token_ids).maps()[0][0]
            h, w = heat.shape
            cells = [(float(heat[r, c]), r * w + c) for r in range(h) for c in range(w)]
            best = max(cells, key=lambda cell: (cell[0], -cell[1]))[1]  # the first of equal peaks
            x, y = centre(*divmod(best, w), h, w)
            expected[method]["pointing"] += item.target[0] <= x < item.target[2] and item.target[1] <= y < item.target[3]
            order = [index for _, index in sorted(cells, key=lambda cell: (-cell[0], cell[1]))]
            for kind in ("deletion", "insertion"):
                curve = []
                for k in range(len(order) + 1):
                    image = pixels.clone() if kind == "deletion" else fill.clone()
                    for index in order[:k]:
                        r, c = divmod(index, w)
                        ys, xs = slice(r * Y // h, (r + 1) * Y // h), slice(c * X // w, (c + 1) * X // w)
                        image[0, :, ys, xs] = (fill if kind == "deletion" else pixels)[0, :, ys, xs]
                    curve.append(probability(image))
                area = sum((curve[k] + curve[k + 1]) / 2 for k in range(len(order))) / len(order)
                expected[method][kind] += area
        cell_chance += sum(item.target[0] <= centre(r, c, 4, 4)[0] < item.target[2]
                           and item.target[1] <= centre(r, c, 4, 4)[1] < item.target[3]
                           for r in range(4) for c in range(4)) / 16
    for method in methods:
        assert report[method]["pointing"] == expected[method]["pointing"] / len(items)
        for kind in ("deletion", "insertion"):
            assert report[method][kind] == pytest.approx(expected[method][kind] / len(items), abs=1e-5)
        assert report[method]["seconds_per_token"] > 0
    assert report["chance"]["random_cell"] == pytest.approx(cell_chance / len(items))
    assert report["chance"]["random_object"] == pytest.approx(0.5)


def test_evaluate_refuses_items_without_a_target_in_one_line(tmp_path, capsys):
    from vlm_fusion.explain.faithfulness import Item, evaluate

    model, processor = tiny_model_and_processor("fusion_llava")
    with pytest.raises(ExplainError, match="item 1 has no target region"):
        evaluate(model, processor, [Item(random_image(0), PROMPT, (0, 0, 4, 4)), Item(random_image(1), PROMPT, None)],
                 ["occlusion"])
    random_image(0).save(tmp_path / "a.png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "question": "what colour is it ?", "target": [0, 0, 8, 8]}\n'
                    '{"image": "a.png", "question": "what colour is it ?"}\n')
    assert main(["explain", "--model", "demo:llava", "--evaluate", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2 has no \"target\"" in err and len(err.splitlines()) == 1


def test_evaluate_prints_a_table_with_the_chance_rates(tmp_path, capsys):
    assert main(["explain", "--model", "demo:blip2", "--evaluate", "shapes", "--items", "3", "--method",
                 "occlusion,relevance"]) == 0
    printed = capsys.readouterr().out
    assert "| demo:blip2 | occlusion |" in printed and "| demo:blip2 | relevance |" in printed
    assert "3 items; answers right" in printed and "a random cell 11.1%" in printed and "random order" in printed


def test_cli_bad_methods_and_markers_are_one_line(tmp_path, capsys):
    image = tmp_path / "image.png"
    random_image(0).save(image)
    common = ["explain", "--model", "demo:llava", "--image", str(image), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(common + ["--prompt", "what ?", "--method", "gradcam"])
    assert "unknown method 'gradcam'" in capsys.readouterr().err
    assert main(common + ["--prompt", "<image> what colour is it ?"]) == 2  # the template adds its own marker
    err = capsys.readouterr().err.strip()
    assert "holds 1 <image> marker(s) and the chat template adds 1" in err and "2 in all for 1 image" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()  # nothing half-written


def test_a_language_model_without_attention_is_refused_in_one_line_and_occlusion_still_works():
    """Mamba has no attention weights: relevance and attention cannot be made, and explain says why before
    generating; occlusion reads only the answer's probabilities."""
    _, processor = tiny_model_and_processor("fusion_llava")
    config = FusionLlavaConfig(vision_config=tiny_vision_config("clip"), image_token_id=processor.image_token_id,
                               text_config={"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2,
                                            "vocab_size": processor.image_token_id, "state_size": 4})
    model = FusionLlavaForConditionalGeneration(config).eval()
    with pytest.raises(ExplainError, match="method 'relevance' needs the language model's attention weights") as error:
        explain(model, processor, [random_image(0)], PROMPT, method="relevance", max_new_tokens=2)
    assert len(str(error.value).splitlines()) == 1 and "use --method occlusion" in str(error.value)
    with pytest.raises(ExplainError, match="method 'attention' needs .* has no attention layers"):
        explain(model, processor, [random_image(0)], PROMPT, max_new_tokens=2)
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):  # the refusals above hold on every release
        pytest.skip("a Mamba LM inside a vlm-fusion model does not run on transformers 5.19 (its output carries "
                    "`cache_params`, and generate cannot prefill a cache of linear-attention layers only); 5.25 runs it")
    result = explain(model, processor, [random_image(0)], PROMPT, method="occlusion", max_new_tokens=2)
    assert result.maps()[0].shape == (2, 4, 4)


@pytest.mark.slow
def test_the_benchmark_prints_a_row_per_size_family_and_method():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "explain.py"), "--sizes", "tiny", "--tokens", "2"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [line for line in out.splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 9 and all(row.split(" | ")[3] != "0.000" for row in rows if "occlusion" in row)
    assert "at the start" in out and "at the end" in out


# ---- pictures and the page ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "blip2", "flamingo"])
def test_cli_writes_a_picture_per_token_a_grid_and_a_page(family, tmp_path, capsys):
    """Every method side by side: a picture per answer token but the special ones, each with one row per method."""
    from PIL import Image

    from vlm_fusion.demo import shapes

    path = tmp_path / "scene.png"
    shapes.render(shapes.sample_scene(__import__("numpy").random.default_rng(1))).save(path)
    assert main(["explain", "--model", f"demo:{family}", "--image", str(path), "--prompt", "how many shapes are there ?",
                 "--method", "all", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    pictures = sorted((tmp_path / "out").glob("token_*.png"))
    assert pictures and f"{len(pictures)} pictures" in printed  # "two </s>": the </s> is left out
    assert all(f"{method} " in printed for method in ("relevance", "occlusion", "attention"))
    assert Image.open(tmp_path / "out" / "answer.png").width >= Image.open(pictures[0]).width
    page = (tmp_path / "out" / "explain.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained


def test_bad_input_is_one_line(tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert main(["explain", "--model", "demo:llava", "--image", str(not_image), "--prompt", "what ?",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable image" in err and len(err.splitlines()) == 1
    image = tmp_path / "image.png"
    random_image(0).save(image)
    assert main(["explain", "--model", "demo:llava", "--image", str(image), "--raw", "--prompt",
                 "USER: <image> <image> what ?", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 <image> markers and 1 image was given" in err and len(err.splitlines()) == 1
    model, processor = tiny_model_and_processor("fusion_llava")
    with pytest.raises(ExplainError, match="PngImageFile|not a PIL image"):
        explain(model, processor, ["image.png"], PROMPT)


def chromium_driver():
    selenium = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = selenium.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--proxy-server=127.0.0.1:9", "--window-size=1200,900"):  # any network request would fail
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = selenium.ChromeService(executable_path=shutil.which("chromedriver"))
    return selenium.Chrome(options=options, service=service)


def test_the_page_in_a_real_browser_switches_methods_keeps_one_scale_and_locks_on_click(tmp_path):
    """The methods side by side or one at a time, one colour scale for the answer whose number is the PNGs' (a
    per-token switch), special tokens out of the strip, the question shown, a token locked by a click."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, processor = tiny_model_and_processor("fusion_llava")
    first = explain(model, processor, [random_image(0)], PROMPT, method="relevance", max_new_tokens=4,
                    question="what is this ?")
    results = [first] + [explain(model, processor, [random_image(0)], PROMPT, method=method, token_ids=first.token_ids,
                                 question="what is this ?") for method in ("occlusion", "attention")]
    results[0].special[-1] = True  # as a </s> would be: out of the strip and the pictures
    assert not torch.allclose(first.maps()[0][0], first.maps()[0][1])
    written = write(results, str(tmp_path))
    assert len(written["tokens"]) == len(first.tokens) - 1
    driver = chromium_driver()
    try:
        driver.get(f"file://{written['page']}")
        heat = driver.find_element(By.ID, "heat-0-0")  # relevance on image 0

        def pixels(canvas=heat):
            return driver.execute_script("return arguments[0].toDataURL()", canvas)

        assert "Question: what is this ?" in driver.find_element(By.ID, "question").text
        last = driver.find_element(By.ID, f"token-{len(first.tokens) - 1}")
        assert not last.is_displayed()  # the special token is out of the strip
        driver.find_element(By.ID, "special").click()
        assert last.is_displayed()
        blank = pixels()
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "token-0")).perform()
        token_0 = pixels()
        for k, method in enumerate(("relevance", "occlusion", "attention")):  # the PNGs' number on every legend
            assert driver.find_element(By.ID, f"legend-top-{k}").text == f"{written['tops'][method]:.3g}"
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "token-1")).perform()
        token_1 = pixels()
        assert blank != token_0 != token_1
        driver.find_element(By.ID, "token-0").click()  # lock token 0
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "token-1")).perform()
        assert pixels() == token_0 and "locked" in driver.find_element(By.ID, "status").text
        Select(driver.find_element(By.ID, "scale")).select_by_value("token")  # per-token scaling
        assert driver.find_element(By.ID, "legend-top-0").text == f"{float(first.maps()[0][0].max()):.3g}"
        Select(driver.find_element(By.ID, "scale")).select_by_value("answer")
        assert pixels() == token_0
        methods = Select(driver.find_element(By.ID, "method"))
        assert [o.text for o in methods.options] == ["side by side", "relevance", "occlusion", "attention"]
        assert all(driver.find_element(By.ID, f"method-{k}").is_displayed() for k in range(3))
        methods.select_by_visible_text("occlusion")
        assert not driver.find_element(By.ID, "method-0").is_displayed()
        assert driver.find_element(By.ID, "method-1").is_displayed()
        attention = driver.find_element(By.ID, "heat-2-0")
        methods.select_by_visible_text("attention")
        before = pixels(attention)
        Select(driver.find_element(By.ID, "layer")).select_by_value("1")  # one layer: another map for the locked token
        assert pixels(attention) != before
        methods.select_by_visible_text("side by side")
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_pictures_draw_each_patch_flat_and_nothing_past_the_images_edge():
    """On the patch grid, each cell one colour; a region larger than the image (padded to a square) is cut at the
    image's edge."""
    import numpy as np
    from PIL import Image

    from vlm_fusion.explain.render import overlay, shown

    image = Image.new("RGB", (64, 32), (255, 255, 255))
    heat = np.array([[0.0, 1.0], [0.5, 0.0]])
    out = np.asarray(overlay(image, heat, (0, -16, 64, 48), top=1.0)).astype(int)  # the square around the image
    base = np.asarray(shown(image)).astype(int)
    assert out.shape == base.shape  # nothing drawn outside the image
    cell = out[: out.shape[0] // 2, out.shape[1] // 2 :]  # the top right cell, inside the image: one flat colour
    assert (cell == cell[0, 0]).all() and (cell != base[0, 0]).any()
