"""Entry point of `vlm_fusion.conversion.convert_idefics` (also `vlm-fusion convert idefics`); run with --help."""

import sys

from vlm_fusion.conversion.convert_idefics import main

if __name__ == "__main__":
    sys.exit(main())
