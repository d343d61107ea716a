"""The README's main command: a small RNAN trained on images that scikit-image ships (no download).

Command:   python -m rnan_jax.train --config experiments/demo.py --workdir /tmp/rnan_demo
Hardware:  2 CPU cores: 25-40 s after installation (compile ~8 s, ~30-40 ms/step).
Model:     x2, 32 features, 2 GCRGs x 3 RNA blocks (~0.2 M parameters).
Data:      astronaut, coffee, chelsea, rocket, immunohistochemistry, hubble_deep_field; validation on a
           held-out 320x240 crop of stereo_motorcycle (bicubic x2: 27.704 dB).
Expected:  validation PSNR above bicubic's (27.704 dB) at step 600: 28.598 dB (+0.894) on an Intel Xeon, 28.563 dB
           (+0.859) on an AMD EPYC (the last digits follow the CPU's float kernels; README.md).
"""
import ml_collections

from rnan_jax import configs


def get_config() -> ml_collections.ConfigDict:
    config = configs.default_config()
    config.total_steps = 600
    config.batch_size = 8
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 200
    config.model.update(scale=2, features=32, num_groups=2, num_blocks=3, gc_reduction=16)
    config.optim.update(lr=1e-3, schedule="cosine")
    config.data.update(source="demo", patch_size=24, val_source="demo", num_workers=0)
    return config
