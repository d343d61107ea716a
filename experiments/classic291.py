"""RNAN x2 on the classic "291" set (T91 + BSD200, as VDSR), for machines without DIV2K.

Command:   python -m rnan_jax.train --config experiments/classic291.py --workdir runs/291_x2
           (--config.model.scale=3 or 4 for other scales; RNAN_DATA_DIR must hold train/T91, train/BSD200
           and benchmark/Set5, the layout of ../shared/data)
Hardware:  one GPU; the paper's model and recipe (experiments/x4.py) with the folder source. LR is made
           with MATLAB-compatible bicubic once per image and cached (data.cache_dir).
Expected:  below the paper's DIV2K numbers (291 images are a tenth of DIV2K's pixels); no full run was
           possible on these machines.
"""
import os

import ml_collections

from rnan_jax import configs
from rnan_jax.env import default_data_dir


def get_config() -> ml_collections.ConfigDict:
    config = configs.default_config()
    config.model.scale = 2
    train = os.path.join(default_data_dir(), "train")
    config.data.update(source="folder", hr_dirs=f"{train}/T91,{train}/BSD200", num_workers=4,
                       val_source="benchmark", val_set="Set5")
    return config
