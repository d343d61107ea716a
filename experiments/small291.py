"""A small RNAN for 2 CPU cores, x2 on the classic "291" set (T91 + BSD200): the recipe of `zoo:small_x2`.

(draft: recipe under measurement)
"""
import os

import ml_collections

from rnan_jax import configs
from rnan_jax.env import default_data_dir


def get_config() -> ml_collections.ConfigDict:
    config = configs.default_config()
    config.total_steps = 14_000
    config.batch_size = 16
    config.log_every = 200
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.model.update(scale=2, features=48, num_groups=2, num_blocks=3, gc_reduction=16)
    config.optim.update(lr=1e-3, schedule="cosine", warmup_steps=0)
    train = os.path.join(default_data_dir(), "train")
    config.data.update(source="folder", hr_dirs=f"{train}/T91,{train}/BSD200", patch_size=32, num_workers=0,
                       read_threads=1, val_source="benchmark", val_set="Set5", val_max_images=0)
    return config
