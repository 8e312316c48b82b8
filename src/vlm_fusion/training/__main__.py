"""`python -m vlm_fusion.training ...` is `vlm-fusion train ...` (what `accelerate launch -m` runs)."""

import sys

from vlm_fusion_cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
