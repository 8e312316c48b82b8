# training/encoding.py imports FusionProcessor from here; this module goes once the merge points it at processing_base.
from .processing_base import FusionProcessor  # noqa: F401
