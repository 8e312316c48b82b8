"""Strict checkpoint conversion: explicit key tables, no unconsumed or missing key, atomic output, logit checks.

A conversion script is a table of `(source regex, target template)` rules plus explicit transforms; everything
here fails loudly instead of printing warnings.
"""

import glob
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager

import torch

from vlm_fusion.checkpoints import ConversionError, preview, read_state_dict, rename_keys  # noqa: F401 (the scripts' names)


def load_exact(model: torch.nn.Module, state_dict: dict) -> None:
    """Load (assign) `state_dict` into `model`, which may sit on the meta device, requiring every non-tied parameter and buffer to be present with its shape."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    persistent_optional = {k for k in expected if k in tied}
    missing = sorted(k for k in expected if k not in state_dict and k not in persistent_optional)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model keys missing from the checkpoint: {preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} converted keys the model does not have: {preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {preview(mismatched)}")
    if problems:
        raise ConversionError("\n".join(problems))
    model.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def partial_prefix(output: str) -> str:
    return f".{os.path.basename(output)}.partial-"


def remove_stale_partials(output: str) -> list[str]:
    """Remove what conversions to `output` killed before they could clean up (SIGKILL, SIGHUP) left behind."""
    parent = os.path.dirname(output)
    stale = sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(partial_prefix(output)) + "*")))
    for path in stale:
        print(f"[cleanup] removing {path}, left by an interrupted conversion to {os.path.basename(output)}")
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _user_permissions(path: str) -> None:
    """`mkdtemp` makes folders 0700; the output gets what the user's umask gives a new folder (and its files)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextmanager
def atomic_output_dir(output: str, *, overwrite: bool = False):
    """Yield a temporary directory beside `output`; it becomes `output` only if the block finishes. Stale temporary
    directories of earlier, killed conversions to the same output are removed first."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(output)
    tmp = tempfile.mkdtemp(prefix=partial_prefix(output), dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _user_permissions(tmp)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)


def write_and_verify(output: str, *, overwrite: bool, model_cls, config, state_dict: dict, processor, verify):
    """
    Build `model_cls(config)` without allocating weights, load `state_dict` exactly, save it and `processor` to a
    temporary directory, run `verify(path)` on what was written, and only then move it to `output`.
    """
    from accelerate import init_empty_weights

    from vlm_fusion.checkpoints import without_machine_details

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        with init_empty_weights(include_buffers=False):
            model = model_cls(config)
        load_exact(model, to_model_layout(state_dict, model_cls, config))
        model.config.architectures = [model_cls.__name__]
        model.save_pretrained(tmp, repo_id=os.path.basename(os.path.abspath(output)))  # the card's title: not tmp's
        processor.save_pretrained(tmp)
        without_machine_details(tmp)  # the tokenizer's `local_files_only`, as it was loaded here
        print(f"[write] {sum(v.numel() for v in state_dict.values()):,} parameters")
        del model
        with torch.no_grad():
            verify(tmp)
    print(f"[done] {output}")


def to_model_layout(state_dict: dict, model_cls, config) -> dict:
    """The conversion tables target the parts layout (`vision_tower.*`, the bridge modules, the whole causal LM under
    `language_model.*`); this moves it into the model's own (`model.*`, `lm_head.*`) with the model's one mapping.
    A model without a headless model inside (BLIP-2's stage 1, `FusionBlip2ForImageTextRetrieval`) keeps the keys its
    tables give."""
    from vlm_fusion.checkpoints import parts_key_mapping

    if getattr(model_cls, "model_class", None) is None:
        return state_dict
    rules = list(parts_key_mapping(config, model_cls.model_class).items())
    return rename_keys(state_dict, rules)


def compare_logits(name: str, ours: torch.Tensor, reference: torch.Tensor, atol: float) -> float:
    """Report the largest absolute logit difference; raise `ConversionError` above `atol`."""
    if ours.shape != reference.shape:
        raise ConversionError(f"{name}: logits shapes differ, ours {tuple(ours.shape)} vs {tuple(reference.shape)}.")
    diff = (ours.float() - reference.float()).abs().max().item()
    print(f"[verify] {name}: max |logit difference| = {diff:.3e} (tolerance {atol:.0e})")
    if not diff <= atol:
        raise ConversionError(f"{name}: logits differ by {diff:.3e} > {atol:.0e}; the conversion is wrong.")
    return diff


def transformers_reference(model_cls, path: str, dtype, source_processor, prompt: str):
    """The logits a converted checkpoint must match: transformers' own `model_cls` run on the source checkpoint,
    fed by the source's processor, which must tokenize the sample prompt exactly as the converted processor does."""

    def reference(inputs):
        model = model_cls.from_pretrained(path, dtype=dtype).eval()
        source_inputs = source_processor(images=sample_image(), text=prompt, return_tensors="pt")
        for key in ("input_ids", "qformer_input_ids"):  # the LM's tokens, and InstructBLIP's Q-Former tokens
            if key in source_inputs and not torch.equal(source_inputs[key], inputs.get(key, source_inputs[key][:0])):
                raise ConversionError(f"The converted processor gives the sample prompt other `{key}` than the source.")
        return model(**source_inputs).logits

    return reference


def sample_image(size: int = 336, seed: int = 0):
    """A deterministic, structured RGB test image (smooth gradients plus noise), no download needed."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    rgb = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), 1 - ramp[None, :].expand(size, size)])
    rgb = (rgb * 0.8 + 0.2 * torch.rand(3, size, size, generator=generator)).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def add_common_arguments(parser) -> None:
    """`--output`, `--dtype`, `--atol` and `--overwrite`, which every conversion script takes."""
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the logit comparison")
    parser.add_argument("--atol", type=float, default=None,
                        help="largest accepted logit difference (default 1e-4 in float32, 5e-2 otherwise)")
    parser.add_argument("--overwrite", action="store_true")


def check_common_arguments(parser, args):
    args.prog = parser.prog
    args.dtype = getattr(torch, args.dtype)
    if args.atol is None:
        args.atol = 1e-4 if args.dtype == torch.float32 else 5e-2
    if not os.path.exists(args.input):
        parser.error(f"--input {args.input} does not exist")
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(convert, args) -> int:
    """
    Run `convert(args)`; a conversion problem ends with its message on stderr and exit code 1. SIGTERM and SIGHUP
    end it as Ctrl-C does — one line, the temporary output removed; what a SIGKILL leaves, the next run removes.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(convert, args)
    finally:  # as they were, for a caller that goes on (tests, a notebook)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(convert, args) -> int:
    from transformers.utils import logging

    logging.disable_progress_bar()  # the script's own lines say what happens; no loading bars between them
    prog = getattr(args, "prog", None)
    prefix = f"{prog}: " if prog else ""  # `vlm-fusion convert llava: error: ...`, as the CLI's own errors
    try:
        convert(args)
    except (ConversionError, ValueError) as error:
        print(f"{prefix}error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}conversion interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


def lm_base_prefix(text_config) -> str:
    """Where the causal LM keeps its decoder (`model` for Llama/OPT, `transformer` for GPT-2)."""
    from vlm_fusion.language_model import causal_lm_class

    return causal_lm_class(text_config).base_model_prefix
