# training/recipe.py imports write_model_card from here; this module goes once the merge points it at
# vlm_fusion.model_card.
from vlm_fusion.model_card import write_model_card  # noqa: F401
