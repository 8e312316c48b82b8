"""Video in the Flamingo-style family: a clip is one `<video>` media whose frames, each plus its learned time
embedding, the resampler's latents read together; clips and images interleave in one prompt."""

import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import causal_lm_of, random_image, reorder_bound
from vlm_fusion import FusionFlamingoConfig, FusionFlamingoForConditionalGeneration
from vlm_fusion.conversion.convert_openflamingo import import_open_flamingo
from test_flamingo import SMALL, build as build_for_images  # noqa: E402

FRAMES = 4  # the processor samples 4 frames; the model's `max_num_frames` is 4


def build(open_gates=True, **kwargs):
    """test_flamingo's tiny model (its gates opened so the media matter), reading clips of up to FRAMES frames."""
    return build_for_images(open_gates=open_gates, video=True, num_frames=FRAMES, **kwargs)


def clip(seed: int, frames: int = FRAMES) -> np.ndarray:
    """A random clip `(frames, 40, 48, 3)`, uint8."""
    return np.random.default_rng(seed).integers(0, 256, (frames, 40, 48, 3), dtype=np.uint8)


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_config_counts_one_marker_per_clip_and_needs_time_embeddings():
    model, processor = build()
    assert model.config.video_token_counts() == (0, 1) and model.config.num_video_tokens(FRAMES) == 1
    assert processor.video_token_id == model.config.video_token_id < model.config.text_config.vocab_size  # a real token
    inputs = processor(videos=[clip(0)], text=["a <video> b"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(model.config.video_token_id) == 1
    with pytest.raises(ValueError, match="`max_num_frames` must be set when `video_token_id`"):
        FusionFlamingoConfig(video_token_id=5, image_token_id=4)


def test_fresh_model_gives_exactly_its_language_models_logits_with_a_clip():
    model, processor = build(open_gates=False)
    inputs = processor(images=[random_image(0)], videos=[clip(1)], text=["a <image> b <video> c d"],
                       return_tensors="pt")
    assert torch.equal(logits(model, **inputs), logits(causal_lm_of(model), input_ids=inputs["input_ids"]))


def test_clip_latents_match_openflamingos_resampler_over_frames_and_time_embeddings():
    """OpenFlamingo's own `PerceiverResampler` (einops: frame embeddings added, `(F v)` flattened, media-time
    embeddings, the same latents over everything) with our weights, on two clips of one sample."""
    import_open_flamingo()  # the package without its `__init__`, which needs open_clip
    from open_flamingo.src.helpers import PerceiverResampler as OpenFlamingoResampler

    model, _ = build(max_num_media=2)
    perceiver = model.model.perceiver
    reference = OpenFlamingoResampler(dim=perceiver.latents.shape[1], depth=2, dim_head=16, heads=2, num_latents=4,
                                      max_num_media=2, max_num_frames=FRAMES).eval()
    renamed = {re.sub(r"layers\.(\d+)\.attn\.", r"layers.\1.0.", re.sub(r"layers\.(\d+)\.ff\.", r"layers.\1.1.", k)): v
               for k, v in perceiver.state_dict().items()}
    reference.load_state_dict(renamed)
    pixels = torch.randn(2, 3, 3, 32, 32)  # two clips of 3 frames (fewer than max_num_frames)
    with torch.no_grad():
        ours = model.model.get_video_features(pixels, media_index=torch.tensor([0, 1])).pooler_output  # (2, L, D_v)
        features = model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1][:, 1:]
        expected = reference(features.unflatten(0, (1, 2, 3)))[0]  # (b=1, T=2, F=3, v, D_v) -> (T, L, D_v)
    # SDPA against OpenFlamingo's einsum softmax: the same float32 math, summed in another order
    diff = (ours - expected).abs().max().item()
    print(f"OpenFlamingo resampler over frames: max |dlatent| = {diff:.2e}")
    assert ours.shape == expected.shape and diff <= reorder_bound(expected)
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the media-time embeddings tell the two clips apart


def test_a_clip_gives_num_latents_whatever_its_length_and_a_longer_clip_is_refused():
    model, _ = build()
    for frames in (1, 2, FRAMES):
        latents = model.model.get_video_features(torch.randn(2, frames, 3, 32, 32)).pooler_output
        assert latents.shape == (2, model.config.num_latents, model.config.vision_config.hidden_size)
    ids = torch.tensor([[3, model.config.video_token_id, 4]])
    with pytest.raises(ValueError, match=r"^A clip has 5 frames, more than `max_num_frames` \(4\)\.$"):
        model(input_ids=ids, pixel_values_videos=torch.randn(1, FRAMES + 1, 3, 32, 32))


def test_text_attends_to_the_image_before_the_clip_and_to_the_clip_after_it():
    model, processor = build()
    inputs = processor(images=[random_image(0)], videos=[clip(1)], text=["a <image> b <video> c d"],
                       return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    at_image, at_video = ids.index(model.config.image_token_id), ids.index(model.config.video_token_id)
    # Logits: changing the clip's pixels changes nothing before `<video>`, every position from it on.
    base = logits(model, **inputs)[0]
    other_clip = logits(model, **{**inputs, "pixel_values_videos": torch.randn_like(inputs["pixel_values_videos"])})[0]
    assert torch.equal(base[:at_video], other_clip[:at_video])
    assert all((base[t] - other_clip[t]).abs().max() > 1e-3 for t in range(at_video, len(ids)))
    # Cross-attention: the block before layer 0 reads the embeddings only, so its output at a token depends on the
    # media that token sees and nothing else: the image up to the clip, the clip from it on.
    block = model.gated_cross_attn_layers["0"]
    seen = []
    block.attn.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    logits(model, **inputs)
    logits(model, **{**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])})
    logits(model, **{**inputs, "pixel_values_videos": torch.randn_like(inputs["pixel_values_videos"])})
    base, other_image, other_clip = seen
    assert torch.equal(base[:at_image], other_image[:at_image]) and not base[:at_image].any()  # nothing to see yet
    assert (base[at_image:at_video] - other_image[at_image:at_video]).abs().amax(-1).min() > 1e-4
    assert torch.equal(base[:at_video], other_clip[:at_video])
    assert torch.equal(base[at_video:], other_image[at_video:])
    assert (base[at_video:] - other_clip[at_video:]).abs().amax(-1).min() > 1e-4


def test_images_and_clips_in_one_batch_are_ordered_by_their_markers():
    model, processor = build()
    prompts = ["<video> x <image> y", "<image> z <video> w"]
    images, videos = [random_image(0), random_image(1)], [clip(2), clip(3)]
    inputs = processor(images=images, videos=videos, text=prompts, padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    video_mask = ids == model.config.video_token_id
    cache = model.encode_media(inputs["pixel_values"], (ids == model.config.image_token_id) | video_mask,
                               inputs["pixel_values_videos"], video_mask)
    with torch.no_grad():
        image_latents = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (2, L, D_v)
        clip_latents = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # (2, L, D_v)
    L = cache.latents_per_image
    assert cache.num_media.tolist() == [2, 2]
    assert torch.equal(cache.media[0, :L], clip_latents[0]) and torch.equal(cache.media[0, L:], image_latents[0])
    assert torch.equal(cache.media[1, :L], image_latents[1]) and torch.equal(cache.media[1, L:], clip_latents[1])
    # The left-padded batch generates what each sample alone does, with and without the cache, greedy and beams.
    cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False))
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = processor(images=[images[i]], videos=[videos[i]], text=[prompt], return_tensors="pt")
        assert torch.equal(cached[i, -5:], model.generate(**alone, max_new_tokens=5, do_sample=False)[0, -5:])
        alone_beams = model.generate(**alone, max_new_tokens=4, num_beams=2, do_sample=False)
        assert torch.equal(beams[i, -4:], alone_beams[0, -4:])


def test_clip_keys_values_are_computed_once_while_decoding():
    model, processor = build()
    inputs = processor(videos=[clip(0)], text=["a <video> b"], return_tensors="pt")
    calls, tower_calls = [], []
    for block in model.gated_cross_attn_layers.values():
        block.attn.to_kv.register_forward_hook(lambda *args: calls.append(1))
    model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (len(calls), len(tower_calls)) == (len(model.gated_cross_attn_layers), 1)


def test_save_load_round_trip_model_and_processor(tmp_path):
    model, processor = build(max_num_media=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and "model.perceiver.frame_embs" in a
    assert (loaded.config.video_token_id, loaded.config.max_num_frames) == (model.config.video_token_id, FRAMES)
    args = dict(images=[random_image(0)], videos=[clip(1)], text=["<video> a <image> b"], return_tensors="pt")
    inputs, again = processor(**args), reloaded(**args)
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert torch.equal(logits(model, **inputs), logits(loaded, **again))


def test_an_image_checkpoint_reads_clips_once_given_max_num_frames_and_its_image_logits_stay(tmp_path):
    video_model, processor = build()
    # The same model saved before it read video: no `<video>` in its config, no time embeddings in its weights.
    config = FusionFlamingoConfig.from_dict({**video_model.config.to_dict(), "video_token_id": None,
                                             "max_num_frames": None})
    image_model = FusionFlamingoForConditionalGeneration(config).eval()
    state = {k: v for k, v in video_model.state_dict().items() if "frame_embs" not in k}
    image_model.load_state_dict(state)
    image_model.save_pretrained(tmp_path)
    assert not any("frame_embs" in k for k in load_file(tmp_path / "model.safetensors"))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(
            tmp_path, video_token_id=video_model.config.video_token_id, max_num_frames=FRAMES).eval()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    frame_embs = loaded.model.perceiver.frame_embs
    assert frame_embs.shape[0] == FRAMES and torch.isfinite(frame_embs).all() and frame_embs.abs().sum() > 0
    inputs = processor(images=[random_image(0)], text=["a <image> b"], return_tensors="pt")
    assert torch.equal(logits(image_model, **inputs), logits(loaded, **inputs))  # images never read them
    with_clip = processor(images=[random_image(0)], videos=[clip(1)], text=["a <image> b <video> c"],
                          return_tensors="pt")
    assert logits(loaded, **with_clip).shape[1] == with_clip["input_ids"].shape[1]


def test_marker_and_clip_counts_must_match():
    model, processor = build()
    ids = torch.tensor([[3, model.config.video_token_id, 4, model.config.video_token_id]])
    with pytest.raises(ValueError, match=r"2 video tokens \(id 60\), 1 videos were given"):
        model(input_ids=ids, pixel_values_videos=torch.randn(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"2 video tokens \(id 60\), 0 videos were given"):
        model(input_ids=torch.cat([ids, torch.tensor([[model.config.image_token_id]])], 1),
              pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="number of <video> tokens"):
        processor(videos=[clip(0), clip(1)], text=["a <video> b"], return_tensors="pt")
