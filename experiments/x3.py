"""RNAN x3: the x4 recipe (experiments/x4.py) at scale 3, on div2k/bicubic_x3.

Command:   python -m rnan_jax.train --config experiments/x3.py --workdir runs/x3 [--config.init_from=runs/x2]
Target (the paper's Table 1, RNAN x3; not reproduced here): Set5 34.73/.9297, Set14 30.59/.8473,
           B100 29.26/.8096, Urban100 28.85/.8667.
"""
import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "x4.py"))["get_config"]()
    config.model.scale = 3
    return config
