"""Entry point of `vlm_fusion.conversion.convert_llava` (also `vlm-fusion convert llava`); run with --help."""

import sys

from vlm_fusion.conversion.convert_llava import main

if __name__ == "__main__":
    sys.exit(main())
