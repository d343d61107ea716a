"""RNAN x2: the x4 recipe (experiments/x4.py) at scale 2, on div2k/bicubic_x2.

Command:   python -m rnan_jax.train --config experiments/x2.py --workdir runs/x2
Target (the paper's Table 1, RNAN x2; not reproduced here): Set5 38.24/.9614, Set14 33.97/.9211,
           B100 32.34/.9017 (as printed: 33.07/.9021 is listed in the B100 column), Urban100 33.07/.9368.
"""
import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "x4.py"))["get_config"]()
    config.model.scale = 2
    return config
