"""RNAN x3: the paper's recipe (`configs.paper_config`, documented in experiments/x4.py) at scale 3, on
div2k/bicubic_x3.

Command:   python -m rnan_jax.train --config experiments/x3.py --workdir runs/x3 [--config.init_from=runs/x2]
Target (the paper's Table 1, RNAN x3; not reproduced here): Set5 34.73/.9297, Set14 30.59/.8473,
           B100 29.26/.8096, Urban100 28.85/.8667.
"""
import ml_collections

from rnan_jax import configs


def get_config() -> ml_collections.ConfigDict:
    return configs.paper_config(3)
