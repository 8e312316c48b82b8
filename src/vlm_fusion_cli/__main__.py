"""`python -m vlm_fusion_cli ...` is `vlm-fusion ...` (and what `vlm-fusion train --accelerate` launches)."""

import sys

from vlm_fusion_cli import main

if __name__ == "__main__":
    sys.exit(main())
