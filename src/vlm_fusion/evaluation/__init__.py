"""Evaluations run on your data (outside the flat model folder: they drive models, they hold no model math).

    retrieval.py  image-text retrieval R@1/5/10 of a stage-1 BLIP-2 Q-Former, by LAVIS's procedure
                  (ITC for every pair, ITM re-ranking of each one's top k): `vlm-fusion evaluate retrieval`
"""
