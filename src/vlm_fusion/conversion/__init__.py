"""Conversion of upstream checkpoints (llava-hf and original LLaVA, LLaVA-NeXT-Video and LLaVA-OneVision, transformers
and LAVIS BLIP-2, InstructBLIP-Video, OpenFlamingo).

Each `convert_*` module is a key table plus explicit transforms, run as `vlm-fusion convert ...` or
`python conversion_scripts/convert_*.py ...`; `common` holds the strict machinery they share.
"""
