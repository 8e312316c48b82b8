"""Entry point of `vlm_fusion.conversion.convert_blip2` (also `vlm-fusion convert blip2`); run with --help."""

import sys

from vlm_fusion.conversion.convert_blip2 import main

if __name__ == "__main__":
    sys.exit(main())
