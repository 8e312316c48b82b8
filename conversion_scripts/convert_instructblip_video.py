"""Entry point of `vlm_fusion.conversion.convert_instructblip_video` (also `vlm-fusion convert instructblip-video`);
run with --help."""

import sys

from vlm_fusion.conversion.convert_instructblip_video import main

if __name__ == "__main__":
    sys.exit(main())
