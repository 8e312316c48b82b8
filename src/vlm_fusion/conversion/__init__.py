"""Conversion of upstream checkpoints (llava-hf and original LLaVA, LLaVA-NeXT-Video and LLaVA-OneVision, transformers
and LAVIS BLIP-2, InstructBLIP-Video, OpenFlamingo).

Each `convert_*` module is a key table plus explicit transforms, run as `vlm-fusion convert ...` or
`python conversion_scripts/convert_*.py ...`; `common` holds the strict machinery they share (the reading and
renaming of a checkpoint's tensors is `vlm_fusion.checkpoints`'), `blip2_common` what BLIP-2's two converters share
(`convert_blip2`: generation; `convert_blip2_stage1`: the Q-Former's stage 1).
"""
