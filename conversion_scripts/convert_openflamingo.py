"""Entry point of `vlm_fusion.conversion.convert_openflamingo` (also `vlm-fusion convert openflamingo`); run with --help."""

import sys

from vlm_fusion.conversion.convert_openflamingo import main

if __name__ == "__main__":
    sys.exit(main())
