"""RNAN x2: the x4 recipe (experiments/x4.py) at scale 2."""
import ml_collections

from experiments import x4


def get_config() -> ml_collections.ConfigDict:
    config = x4.get_config()
    config.model.scale = 2
    return config
