"""What the commands share: the one-line error, argparse types, and the checks of a named model made before anything
heavy is imported. Standard library only at the top (see the package's docstring)."""

import argparse
import os
import re
import sys

FAMILY_NAMES = ("llava", "blip2", "flamingo")  # `vlm_fusion.FAMILIES`' short names, copied: --help imports no torch
DEMO_PREFIX = "demo:"  # `--model demo:llava` names a demo checkpoint shipped in the package
MODEL_HELP = "directory, Hub id, or a shipped demo model: " + ", ".join(DEMO_PREFIX + f for f in FAMILY_NAMES)


def fail(message: str) -> int:
    print(f"vlm-fusion: error: {message}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging  # lazy: import time

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ---- --model: before anything heavy ----------------------------------------------------------------------------
HUB_ID = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")  # huggingface_hub's validate_repo_id: [namespace/]name
OFFLINE = ("1", "on", "yes", "true")  # huggingface_hub's reading of HF_HUB_OFFLINE


def could_be_hub_id(name: str) -> bool:
    """Whether `name` is shaped as a Hub repo id (no path of a folder: no ./, ../, /, ~, \\, no -- nor ..)."""
    return bool(HUB_ID.match(name)) and "--" not in name and ".." not in name and not name.startswith(("-", ".")) \
        and not name.endswith(("-", ".")) and not name.endswith(".git")


def in_hub_cache(name: str) -> bool:
    """Whether the Hub cache holds a config.json of model `name`, by huggingface_hub's cache layout
    (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub; `models--owner--name/snapshots/*/`) without
    importing huggingface_hub (0.7 s)."""
    import glob

    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                               or os.path.join(home, "hub"))
    folder = os.path.join(cache, "models--" + name.replace("/", "--"), "snapshots")
    return bool(glob.glob(os.path.join(glob.escape(folder), "*", "config.json")))


def missing_model(name: str, flag: str = "--model") -> str | None:
    """Why `name` cannot be the model `flag` names, in one line, before anything heavy is imported, or None: a folder,
    a shipped demo model, or a Hub id that may be there. A name that is no folder is said to be none first; only a name
    shaped as a Hub id then goes to the Hub, and with HF_HUB_OFFLINE set only when the Hub cache holds it (the Hub's
    client would otherwise end, after its retries, blaming the network)."""
    if name.startswith(DEMO_PREFIX) or os.path.isdir(name):
        return None
    if os.path.exists(name):
        return f"{flag} {name} is a file, not a model folder (a folder with config.json and the weights)"
    where = f"no model folder {name}" + ("" if os.path.isabs(name) else f" (nothing at {os.path.abspath(name)})")
    if not could_be_hub_id(name):
        return f"{flag}: {where}, and {name!r} is not a Hub id either"
    cached = in_hub_cache(name)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE:
        return None if cached else \
            f"{flag}: {where}, and the Hub id {name} is not in the Hub cache (HF_HUB_OFFLINE is set)"
    from huggingface_hub import constants, model_info  # about 0.7 s: only when the Hub is to be asked
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:  # one request, no retries: transformers' download would retry a missing network for a minute
        model_info(name, timeout=10)
    except GatedRepoError:
        pass  # there, behind its terms: transformers' message says what to do
    except RepositoryNotFoundError:
        return f"{flag}: {where}, and no model {name} on the Hub (or a private one: `hf auth login`)"
    except HfHubHTTPError:
        pass  # the Hub answered: transformers' own message will say the rest
    except Exception as error:  # the network
        if not cached:
            return f"{flag}: {where}, and the Hub is out of reach ({str(error).strip() or type(error).__name__})"
        print(f"vlm-fusion: {flag}: {where}, and the Hub is out of reach: the Hub cache's {name}", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by transformers when imported, after this
        constants.HF_HUB_OFFLINE = True
        return None
    print(f"vlm-fusion: {flag}: {where}; the Hub's {name}", file=sys.stderr)
    return None


def model_arguments(args) -> list[tuple[str, str]]:
    """`(flag, name)` of every model a command's arguments name: --model (serve's MODEL), and train's parts."""
    flags = {"model": "--model", "vision_tower": "--vision-tower", "language_model": "--language-model",
             "qformer_init": "--qformer-init"}
    named = [(flag, getattr(args, key)) for key, flag in flags.items() if getattr(args, key, None)]
    return [("MODEL", name) if args.command == "serve" else (flag, name) for flag, name in named]


# ---- --model: when a command runs -------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """A directory or Hub id as given; `demo:<family>` -> the shipped demo checkpoint."""
    if not name.startswith(DEMO_PREFIX):
        return name
    from vlm_fusion.demo import checkpoint  # lazy: import time

    return checkpoint(name[len(DEMO_PREFIX):])


def load_failure(path: str, error: Exception) -> str:
    """One line for a model that does not load, naming the file at fault where there is one."""
    from safetensors import SafetensorError  # lazy: import time

    if isinstance(error, SafetensorError) and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        return f"{os.path.join(path, ', '.join(files))} is not a readable safetensors file ({error})"
    return f"cannot load a model from {path}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
