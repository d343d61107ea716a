"""RNAN x3: the x4 recipe (experiments/x4.py) at scale 3."""
import ml_collections

from experiments import x4


def get_config() -> ml_collections.ConfigDict:
    config = x4.get_config()
    config.model.scale = 3
    return config
