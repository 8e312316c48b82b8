"""Entry point of `vlm_fusion.conversion.convert_llava_video` (LLaVA-NeXT-Video, LLaVA-OneVision); run with --help."""

import sys

from vlm_fusion.conversion.convert_llava_video import main

if __name__ == "__main__":
    sys.exit(main())
