"""RNAN x4, the paper's recipe (section 3.1 as ../shared/DESIGN.md reads it).

Model: 10 GCRGs x 20 RNA blocks, 64 features, N = M = 1, r = 16: 17,303,749 parameters.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        scale=4, features=64, num_groups=10, num_blocks=20, group_interval=1, block_interval=1,
        gc_reduction=16, rgb_mean=(0.4488, 0.4371, 0.4040), dtype="float32"))
    return config
