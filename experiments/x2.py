"""RNAN x2: the paper's recipe (`configs.paper_config`, documented in experiments/x4.py) at scale 2, on
div2k/bicubic_x2.

Command:   python -m rnan_jax.train --config experiments/x2.py --workdir runs/x2
Target (the paper's Table 1, RNAN x2; not reproduced here): Set5 38.24/.9614, Set14 33.97/.9211,
           B100 33.07/.9021 as printed (what rnan_jax.report's PAPER_TABLE1 holds), Urban100 33.07/.9368.
           The B100 PSNR looks like a misprint: 33.07 is also RNAN's Urban100 x2 value, and comparable methods
           score about 32.3 on B100 x2 (EDSR 32.32, RDN 32.34): expect a value near theirs, not 33.07.
"""
import ml_collections

from rnan_jax import configs


def get_config() -> ml_collections.ConfigDict:
    return configs.paper_config(2)
