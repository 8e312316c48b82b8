"""`vlm-fusion convert SOURCE ...`: an upstream checkpoint to a vlm-fusion one; everything after SOURCE (--help
included) is the converter's (`vlm_fusion.conversion`)."""

CONVERTERS = {"llava": "convert_llava", "blip2": "convert_blip2", "openflamingo": "convert_openflamingo",
              "idefics": "convert_idefics", "llava-video": "convert_llava_video",
              "instructblip-video": "convert_instructblip_video"}


def add_arguments(p) -> None:
    p.add_argument("source", choices=sorted(CONVERTERS))


def run(source: str, rest: list[str]) -> int:
    import importlib  # lazy, as the converter's import of torch and vlm_fusion: import time

    module = importlib.import_module(f"vlm_fusion.conversion.{CONVERTERS[source]}")
    return module.main(rest, prog=f"vlm-fusion convert {source}")
