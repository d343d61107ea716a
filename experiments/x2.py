"""RNAN x2: the paper's recipe (`configs.paper_config`, documented in experiments/x4.py) at scale 2, on
div2k/bicubic_x2.

Command:   python -m rnan_jax.train --config experiments/x2.py --workdir runs/x2
Target (the paper's Table 1, RNAN x2; not reproduced here): Set5 38.24/.9614, Set14 33.97/.9211,
           B100 32.34/.9017 (as printed: 33.07/.9021 is listed in the B100 column), Urban100 33.07/.9368.
"""
import ml_collections

from rnan_jax import configs


def get_config() -> ml_collections.ConfigDict:
    return configs.paper_config(2)
