"""The GPU paths, on a GPU. For each family, on a tiny model (the demo checkpoints where an answer must mean
something):

- fp32 on the GPU gives the CPU's logits (to float32 summation order, TF32 off) and greedy tokens;
- bf16 and fp16 generate the fp32 greedy answer of the demo model (a difference is reported with its position, and
  passes only where fp32 itself was near a tie);
- `device_map="auto"` with a `max_memory` that fits part of the model on the GPU and part on the CPU, the rest on
  disk: it loads there and gives the CPU's logits and tokens;
- bitsandbytes 4-bit on the GPU (its CUDA kernels) quantizes exactly the LM's linear layers, keeps the tower, the
  bridge and the head in full precision, and generates;
- `attn_implementation="sdpa"` gives `"eager"`'s logits, in fp32 and in bf16 (where SDPA may pick its flash kernel);
- a static cache with a compiled forward generates what the dynamic cache does;
- one `vlm-fusion train` step in bf16 on the GPU, and on two GPUs through accelerate's launcher where there are two.

Skipped, with the reason, where `torch.cuda.is_available()` is false. `VLM_FUSION_TEST_DEVICE=cpu` runs the same
tests on the CPU (`scripts/gpu_check.py --dry-run` does, so that they cannot rot where there is no GPU): there the
device-vs-CPU comparisons compare the CPU with itself, the two-GPU run is two processes over gloo, and torch.compile
uses dynamo's `aot_eager` backend (the same capture, guards and AOT autograd; inductor's C++ build of the CPU kernels
would take a minute on 2 cores, and says nothing about its GPU kernels). Each test records its figures with
`record_property` (in pytest's JUnit XML, and in gpu_check's report).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

DEVICE = os.environ.get("VLM_FUSION_TEST_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("torch.cuda.is_available() is false: these tests need a GPU (VLM_FUSION_TEST_DEVICE=cpu runs them on "
                "the CPU)", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, CompileConfig  # noqa: E402

from conftest import FLOAT32_REORDER, random_image  # noqa: E402
from vlm_fusion import demo  # noqa: E402
from vlm_fusion.demo import shapes  # noqa: E402
from vlm_fusion.tools.tiny import TINY_QFORMER, tiny_model_and_processor, write_training_parts  # noqa: E402

# fp32 logits (|logit| < 1 on these random tiny models), device vs CPU and sdpa vs eager: the same math, summed in
# other orders by other kernels (TF32 off): conftest's FLOAT32_REORDER.
TOLERANCE = FLOAT32_REORDER
# bf16 logits, sdpa vs eager: eager rounds each attention's scores, weights and output to bf16 where SDPA's kernel keeps
# float32 inside, ~3 roundings of 2^-8 (bf16's unit roundoff) per attention layer, over at most 8 of them (tower,
# bridge, LM and gated blocks: 2 each here); roundings of either sign add as sqrt(3 x 8) x 2^-8 = 1.9e-2 on logits of
# order 1.
BF16_TOLERANCE = 2e-2
NEAR_TIE = 0.5  # a half-precision answer may leave fp32's only where fp32's top two logits were this close
FAMILIES = {
    "fusion_llava": {},
    "fusion_blip2": TINY_QFORMER,
    "fusion_flamingo": dict(num_latents=4, perceiver_depth=2, perceiver_heads=2, perceiver_head_dim=32,
                            cross_attention_heads=2, cross_attention_head_dim=32),
}
PROMPT = "<image> what is shown ?"
NEW_TOKENS = 5


@pytest.fixture(autouse=True, scope="module")
def no_tf32():
    """fp32 matmuls and convolutions in full fp32 on the GPU: cuDNN would otherwise run the patch embedding in TF32.
    (The flags torch calls legacy: reading them, as accelerate and inductor do, raises once the new ones are set.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """A tiny model of each family (CLIP + Llama, widths that 4-bit takes), saved, with its inputs and its fp32 logits
    and greedy tokens on the CPU: the reference every test compares with."""
    torch.manual_seed(0)
    family = request.param
    model, processor = tiny_model_and_processor(family, "clip", "llama", **FAMILIES[family])
    if family == "fusion_flamingo":  # opened gates: the images reach the logits
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.4)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    inputs = processor(images=[random_image(0)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return family, path, model, inputs, logits, tokens


def max_difference(logits, reference, inputs) -> float:
    """Largest |difference| of two logits tensors (any devices, any dtypes) at the positions the mask keeps."""
    diff = logits.float().cpu() - reference.float().cpu()
    return diff[inputs["attention_mask"].bool().cpu()].abs().max().item()


def load(path, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()


def logits_and_tokens(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).cpu()


def test_fp32_logits_and_tokens_on_the_device_are_the_cpus(saved, record_property):
    family, path, _, inputs, logits, tokens = saved
    model = load(path, device_map=DEVICE)
    assert {p.device.type for p in model.parameters()} == {torch.device(DEVICE).type}
    device_logits, device_tokens = logits_and_tokens(model, inputs.to(DEVICE))
    diff = max_difference(device_logits, logits, inputs)
    record_property("max_abs_dlogit_vs_cpu", diff)
    print(f"{family} fp32 on {DEVICE} vs cpu: max |dlogit| = {diff:.2e}")
    assert diff <= TOLERANCE
    assert torch.equal(device_tokens, tokens)


# ---- half precision: the demo models, whose answers are real --------------------------------------------------------
@pytest.fixture(scope="module", params=demo.MODELS)
def demo_model(request):
    """A demo checkpoint, two held-out questions (a one-word answer and a reasoned one, up to 16 tokens) as its chat
    template renders them, and its fp32 answers on the CPU."""
    path = demo.checkpoint(request.param)
    processor = AutoProcessor.from_pretrained(path)
    batches = []
    for image, _, question, _ in shapes.examples(1, 2, kinds=("colour", "left_of")):
        images = [[image]] if request.param == "flamingo" else [image]
        batches.append(processor(images=images, text=[shapes.PROMPT.format(question=question)], return_tensors="pt"))
    cpu = load(path)
    answers = [answer(cpu, inputs)[0] for inputs in batches]
    return request.param, path, processor, batches, answers


def answer(model, inputs):
    """Greedy answer tokens (exactly as generated, end of turn included) and fp32-cast scores of each step."""
    out = model.generate(**inputs, max_new_tokens=shapes.MAX_ANSWER_TOKENS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.scores)[:, 0].float().cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_generates_the_fp32_answer(demo_model, dtype, record_property):
    family, path, processor, batches, cpu_answers = demo_model
    fp32, half = load(path, device_map=DEVICE), load(path, device_map=DEVICE, dtype=dtype)
    assert half.language_model.dtype == dtype
    if family == "blip2":  # declared fp32-only, as transformers keeps BLIP-2's Q-Former
        assert half.model.qformer.query_tokens.dtype == torch.float32
    firsts, departures = [], []
    for inputs, cpu_answer in zip(batches, cpu_answers):
        inputs = inputs.to(DEVICE)
        reference, scores = answer(fp32, inputs)
        assert reference == cpu_answer  # fp32 on the device answers as on the CPU
        tokens, _ = answer(half, inputs)
        first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                     None if len(tokens) == len(reference) else min(len(tokens), len(reference)))
        firsts.append(first)
        said = f"{family} {dtype} on {DEVICE}: {processor.decode(tokens, skip_special_tokens=True)!r}"
        if first is None:
            print(f"{said}, as fp32")
            continue
        top2 = scores[first].topk(2).values
        departures.append((first, (top2[0] - top2[1]).item()))
        print(f"{said}; fp32 said {processor.decode(reference, skip_special_tokens=True)!r}: they part at answer "
              f"token {first}, where fp32's top two logits were {departures[-1][1]:.3f} apart")
    record_property("first_differing_position", json.dumps(firsts))  # per question; null: the whole answer agrees
    for first, margin in departures:
        assert margin < NEAR_TIE, f"{dtype} leaves fp32's answer at token {first}, where fp32 was sure ({margin:.2f})"


# ---- loading: device maps, 4-bit, attention implementations ------------------------------------------------------
def test_device_map_auto_over_the_gpu_the_cpu_and_disk(saved, tmp_path, record_property):
    """max_memory: 40 % of the model on the GPU, 45 % on the CPU (accelerate keeps room for the largest layer on each
    main device, so less would leave one empty); the rest goes to disk."""
    family, path, model, inputs, logits, tokens = saved
    footprint = model.get_memory_footprint()
    max_memory = {0: int(0.40 * footprint)} if ON_GPU else {}
    max_memory["cpu"] = int(0.45 * footprint)
    offloaded = load(path, device_map="auto", max_memory=max_memory, offload_folder=str(tmp_path))
    placement = offloaded.hf_device_map
    print(f"{family} device map: {placement}")
    devices = [str(device) for device in placement.values()]
    record_property("modules_per_device", json.dumps({d: devices.count(d) for d in dict.fromkeys(devices)}))
    assert set(placement.values()) == ({0, "cpu", "disk"} if ON_GPU else {"cpu", "disk"})
    offloaded_logits, offloaded_tokens = logits_and_tokens(offloaded, inputs.to(DEVICE))
    diff = max_difference(offloaded_logits, logits, inputs)
    record_property("max_abs_dlogit_vs_cpu", diff)
    assert diff <= TOLERANCE
    assert torch.equal(offloaded_tokens, tokens)


def test_4bit_on_the_device_keeps_tower_bridge_and_head_in_full_precision(saved, record_property):
    family, path, model, inputs, logits, tokens = saved
    quantized = load(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map=DEVICE)
    four_bit = {name for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    expected = {f"model.language_model.{name}" for name, module in model.language_model.named_modules()
                if type(module) is torch.nn.Linear and "gated_cross_attn" not in name}
    assert four_bit == expected
    for name, parameter in quantized.named_parameters():
        assert parameter.device.type == torch.device(DEVICE).type, name
        packed = name.rsplit(".", 1)[0] in four_bit and name.endswith(".weight")
        assert parameter.dtype == (torch.uint8 if packed else torch.float32), name
    kept = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
            for name, module in quantized.named_modules() if type(module) is torch.nn.Linear}
    assert "lm_head" in kept and "vision_tower" in kept and kept & {"multi_modal_projector", "qformer", "perceiver"}
    with torch.no_grad():
        quantized_logits = quantized(**inputs.to(DEVICE)).logits
    out = quantized.generate(**inputs.to(DEVICE), max_new_tokens=NEW_TOKENS, do_sample=False)
    diff = max_difference(quantized_logits, logits, inputs)
    footprint = quantized.get_memory_footprint()
    record_property("footprint_bytes", footprint)
    record_property("max_abs_dlogit_vs_fp32", diff)
    print(f"{family} 4-bit on {DEVICE}: {footprint:,} B (fp32 {model.get_memory_footprint():,} B), full precision: "
          f"{sorted(kept)}, max |dlogit| vs fp32 {diff:.3f}")
    assert footprint < model.get_memory_footprint()
    assert torch.isfinite(quantized_logits).all() and out.shape == tokens.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_gives_eagers_logits(saved, dtype, record_property):
    family, path, _, inputs, _, _ = saved
    eager = load(path, device_map=DEVICE, dtype=dtype, attn_implementation="eager")
    sdpa = load(path, device_map=DEVICE, dtype=dtype, attn_implementation="sdpa")
    for config in (sdpa.config.text_config, sdpa.config.vision_config):
        assert config._attn_implementation == "sdpa"
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        diff = max_difference(sdpa(**inputs.to(DEVICE)).logits, eager(**inputs.to(DEVICE)).logits, inputs)
    record_property("max_abs_dlogit_sdpa_vs_eager", diff)
    print(f"{family} {dtype} on {DEVICE}: sdpa vs eager max |dlogit| = {diff:.2e}")
    assert diff <= (TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE)


# ---- static cache + torch.compile ------------------------------------------------------------------------------------
def test_static_cache_and_compile_generate_what_the_dynamic_cache_does(saved, record_property):
    from torch._dynamo.utils import counters

    family, path, _, inputs, _, tokens = saved
    model = load(path, device_map=DEVICE)
    inputs = inputs.to(DEVICE)
    dynamic = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    compile_config = CompileConfig(backend="inductor" if ON_GPU else "aot_eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    graphs = counters["stats"]["unique_graphs"]
    static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                            compile_config=compile_config)
    compiled = counters["stats"]["unique_graphs"] - graphs
    record_property("compiled_graphs", compiled)
    record_property("graph_breaks", sum(counters["graph_break"].values()))
    print(f"{family} on {DEVICE}: {compiled} graphs compiled ({compile_config.backend}), "
          f"graph breaks so far: {dict(counters['graph_break'])}")
    assert hasattr(model, "_compiled_call") and compiled > 0  # the decoding steps ran compiled
    assert torch.equal(static, dynamic)
    assert torch.equal(static.cpu(), tokens)


# ---- one training step in bf16 ---------------------------------------------------------------------------------------
# `vlm-fusion train` in each process, recording where each step ran: the device of the model's parameters, and the
# dtype of lm_head's output (bf16 under the Trainer's autocast).
INSTRUMENTED = textwrap.dedent("""
    import json, os, sys
    from vlm_fusion.training import trainer
    from vlm_fusion_cli import main

    record, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
    seen = {}
    step = trainer.FusionTrainer.training_step
    def training_step(self, model, inputs, *args, **kwargs):
        inner = self.accelerator.unwrap_model(model)
        hook = inner.lm_head.register_forward_hook(lambda m, i, out: seen.update(dtype=str(out.dtype)))
        loss = step(self, model, inputs, *args, **kwargs)
        hook.remove()
        with open(f"{record}.{rank}", "a") as f:
            f.write(json.dumps({"device": str(next(inner.parameters()).device), "lm_head_output": seen["dtype"],
                                "loss": loss.item()}) + "\\n")
        return loss
    trainer.FusionTrainer.training_step = training_step
    sys.exit(main(["train", *sys.argv[2:]]))
""")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def train_one_step(parts, out, launcher=()):
    """One instruct step of a LLaVA-style model composed from parts, in bf16; each process's record."""
    script, record = out.parent / "instrumented.py", out.parent / "steps"
    script.write_text(INSTRUMENTED)
    argv = ["--stage", "instruct", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(parts / "conversations.json"),
            "--image-folder", str(parts / "images"), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "2", "--logging-steps", "1", "--bf16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if ON_GPU and not launcher:  # one GPU: with several visible, the Trainer would wrap the model in DataParallel
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    done = subprocess.run([sys.executable, *launcher, str(script), str(record), *argv], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    records = {int(path.name.rsplit(".", 1)[1]): [json.loads(line) for line in path.read_text().splitlines()]
               for path in out.parent.glob("steps.*")}
    return summary, records


def test_one_train_step_in_bf16_on_the_device(parts, tmp_path, record_property):
    summary, records = train_one_step(parts, tmp_path / "out")
    record_property("loss", summary["final_loss"])
    print(f"1 process: {records}")
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    assert records == {0: [{"device": records[0][0]["device"], "lm_head_output": "torch.bfloat16",
                            "loss": records[0][0]["loss"]}]}
    assert torch.device(records[0][0]["device"]).type == torch.device(DEVICE).type


def test_one_train_step_in_bf16_on_two_gpus_through_the_launcher(parts, tmp_path, record_property):
    if ON_GPU and torch.cuda.device_count() < 2:
        pytest.skip(f"{torch.cuda.device_count()} GPU here: the two-GPU run needs two")
    import vlm_fusion.training

    config = os.path.join(os.path.dirname(vlm_fusion.training.__file__), "accelerate", "ddp.yaml")
    launcher = ("-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2")
    summary, records = train_one_step(parts, tmp_path / "out", launcher)
    record_property("loss", summary["final_loss"])
    print(f"2 processes: {records}")
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    assert sorted(records) == [0, 1] and all(len(steps) == 1 for steps in records.values())
    assert all(steps[0]["lm_head_output"] == "torch.bfloat16" for steps in records.values())
    devices = [records[rank][0]["device"] for rank in (0, 1)]
    assert devices == (["cuda:0", "cuda:1"] if ON_GPU else ["cpu", "cpu"])
