"""`vlm-fusion serve`: transformers' own OpenAI-compatible server (`transformers serve`) with the families known to it.

transformers' server (`transformers/cli/serving/`, 5.19 to 5.25) finds a model's class in two places that the Auto
classes' registration (`vlm_fusion/__init__.py`) does not reach:

- loading (`ModelManager._load_model`): a model type outside `MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES` is built by
  `getattr(transformers, config.architectures[0])`, so `transformers serve DIR` dies with "module transformers has no
  attribute FusionLlavaForConditionalGeneration". Setting the class on `import transformers` from a wrapper does not
  reach it: importing `transformers.processing_utils` runs `direct_transformers_import`, which executes transformers'
  `__init__.py` again and puts a new module object in `sys.modules["transformers"]`; the loader holds that later one.
  `register` sets the classes on the very module object the loader's module holds.
- the modality (`ModelManager.get_model_modality`): a class named in none of the causal-LM, image-text-to-text and
  multimodal tables is an "Unknown modality" error, and only a VLM's messages keep their images. `register` adds each
  family to `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` (model type -> class name), where the Auto classes already
  resolve it (`AutoModelForImageTextToText.register`).

Both hold in this process only, hence a command of ours rather than `transformers serve`. From 5.25 the model loads in
a process the server spawns (`EngineClient.start_process`, `multiprocessing.get_context("spawn")`): a fresh interpreter
that imports neither vlm_fusion nor this module, where the families are unknown ("model type `fusion_llava` but
Transformers does not recognize this architecture"). What crosses into it is the server's `ModelLoader` (pickled, in
`partial(loader.load_model_and_processor, ...)`), so the server is given a loader of ours (`FusionModelLoader`,
a subclass with nothing changed but where it lives): unpickling it imports this module, hence vlm_fusion, and building
it runs `register` there too. 5.19 to 5.24 load in the server's process and have no `ModelLoader`; they need `register`
alone. The request path is then
transformers' own: the chat template and processor of the checkpoint, `model.generate`, greedy at `temperature: 0`.
A request the processor rejects (an image that is not one, a count mismatch) is answered with HTTP 400 and one line,
not transformers' bare 500 (which OpenAI clients retry).

Clips: the server keeps a chat request's `video_url` parts (`get_processor_inputs_from_messages`: `{"type": "video",
"url": URL}` for a VLM) and hands them to `processor.apply_chat_template(..., tokenize=True)`, which renders `<video>`
and calls the processor with `videos=[[URL, ...]]` (one list per conversation) and the URL as given: our video processor
reads a local path, a `file://` URL, an http(s) URL or a base64 data URL. The server also sets `num_frames=32` for any
request with a clip ("Gemma 4's default"), under its `--chat-template-kwargs` and a request's `chat_template_kwargs`;
32 frames is not what the checkpoint was given (its video processor's `num_frames` / `fps`, what `vlm-fusion generate
--video` samples) and a shorter clip would be refused, so `vlm-fusion serve` sets `"num_frames": null` among the
server's template arguments (unless `--chat-template-kwargs` names `num_frames`): the checkpoint's own sampling, a
request's `chat_template_kwargs` (`{"num_frames": N}` or `{"fps": R}`) still choosing.

Continuous batching (`--continuous-batching`) is refused: transformers' server batches continuously only text-only
models (`GenerationState.use_continuous_batching` requires `Modality.LLM`), and its continuous-batching manager takes a
prompt's token ids alone (`ContinuousBatchingManager.add_request(input_ids, ...)`), so no pixel values (nor Flamingo's
media keys / values) could reach the model; passed on, a VLM falls back (with a warning) to one request at a time.
"""

import sys

CONTINUOUS_BATCHING_REFUSED = (
    "--continuous-batching: transformers' server batches continuously only text-only models (its "
    "ContinuousBatchingManager.add_request takes token ids, no images), so it is refused for vlm-fusion models")


def register() -> None:
    """Make every family loadable and a VLM for transformers' server, in this process (idempotent): in the server's,
    and from 5.25 in the model's process it spawns, which builds `FusionModelLoader` when it unpickles the loader."""
    from transformers.cli.serving import model_manager
    from transformers.models.auto import modeling_auto

    from vlm_fusion import FAMILIES

    for model_type, family in FAMILIES.items():
        setattr(model_manager.transformers, family.model.__name__, family.model)
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type] = family.model.__name__
    answer_bad_requests_with_400()


def __getattr__(name: str):
    """`FusionModelLoader`, built on first use (it subclasses a class of transformers' serving extras, which importing
    this module must not need): pickle finds the class by this name in the process the server spawns."""
    if name != "FusionModelLoader":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers.cli.serving.model_manager import ModelLoader

    register()  # in a spawned model process, unpickling the loader is the first thing of ours to run

    class FusionModelLoader(ModelLoader):
        """transformers' `ModelLoader` (5.25+), unchanged, defined here so that the model's process imports vlm_fusion
        (and registers the families) before it loads the model."""

    FusionModelLoader.__module__, FusionModelLoader.__qualname__ = __name__, "FusionModelLoader"
    globals()["FusionModelLoader"] = FusionModelLoader
    return FusionModelLoader


def use_fusion_model_loader() -> None:
    """5.25+: have `Serve` build its loader from `FusionModelLoader` (it imports `ModelLoader` from `model_manager`
    when it starts). Earlier releases load in this process and have no `ModelLoader`: nothing to do."""
    from transformers.cli.serving import model_manager

    if hasattr(model_manager, "ModelLoader"):
        model_manager.ModelLoader = getattr(sys.modules[__name__], "FusionModelLoader")


def answer_bad_requests_with_400() -> None:
    """Have the app transformers' `Serve` builds answer a `ValueError` raised by a request (the processor's: an image
    that is not one, an image-token count mismatch) with HTTP 400 and OpenAI's error body, instead of a bare 500."""
    from fastapi.responses import JSONResponse
    from transformers.cli.serving import server

    build = server.build_server
    if getattr(build, "answers_bad_requests_with_400", False):
        return

    async def bad_request(_request, error: ValueError):
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": 400}},
                            status_code=400)

    def build_server(*args, **kwargs):
        app = build(*args, **kwargs)
        app.add_exception_handler(ValueError, bad_request)
        return app

    build_server.answers_bad_requests_with_400 = True
    server.build_server = build_server  # `Serve` imports it when it starts, so it takes this one


def with_checkpoint_frames(options: list[str]) -> list[str]:
    """`options` with `"num_frames": null` in `--chat-template-kwargs` (added, or put in the JSON given, unless that
    names `num_frames`), so that a clip is sampled as the checkpoint's video processor says rather than at the
    server's 32 frames. JSON transformers cannot read is left for it to refuse."""
    import json

    for i, option in enumerate(options):
        if option == "--chat-template-kwargs" and i + 1 < len(options):
            at, given = i + 1, options[i + 1]
        elif option.startswith("--chat-template-kwargs="):
            at, given = i, option.split("=", 1)[1]
        else:
            continue
        try:
            kwargs = json.loads(given)
        except ValueError:
            return options
        if not isinstance(kwargs, dict) or "num_frames" in kwargs:
            return options
        value = json.dumps({"num_frames": None, **kwargs})
        return [*options[:at], value if at == i + 1 else f"--chat-template-kwargs={value}", *options[at + 1:]]
    return [*options, "--chat-template-kwargs", '{"num_frames": null}']


def main(model: str, options: list[str]) -> int:
    """Run `transformers serve MODEL OPTIONS...` (the installed transformers' options, `--help` included) with the
    families registered; returns its exit status."""
    if "--continuous-batching" in options:
        print(f"vlm-fusion: error: {CONTINUOUS_BATCHING_REFUSED}", file=sys.stderr)
        return 2
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        print('vlm-fusion: error: transformers\' server needs its serving extras: pip install "transformers[serving]"',
              file=sys.stderr)
        return 2
    register()
    use_fusion_model_loader()
    from huggingface_hub import typer_factory
    from transformers.cli.serve import Serve

    # transformers' own `transformers` app, with its `serve` command alone (its other commands' imports are not ours
    # to need: 5.19's `chat` imports `requests`)
    app = typer_factory(help="transformers serve with the vlm-fusion families known to it")
    app.command(name="serve")(Serve)
    if not {"--help", "-h"} & set(options):
        print(f"vlm-fusion serve: {model} on transformers serve; requests name the model as {model!r} (the OpenAI "
              "API's `model` field)", file=sys.stderr)
    try:
        app(["serve", model, *with_checkpoint_frames(options)], prog_name="vlm-fusion")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0
