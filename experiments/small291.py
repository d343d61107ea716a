"""A small RNAN for 2 CPU cores, x2 on the classic "291" set (T91 + BSD200): the recipe of `zoo:small_x2`.

Command:   python -m rnan_jax.train --config experiments/small291.py --workdir runs/small291_x2
           (RNAN_DATA_DIR must hold train/T91, train/BSD200 and benchmark/Set5: the layout of ../shared/data)
Hardware:  2 CPU cores (AMD EPYC, AVX-512), jax 0.10.2: about 9 steps/s (the Winograd conv kernels of
           tools/BENCHMARKS.md "Stop 14"), 36,000 steps in 66 minutes.
Model:     x2, C = 48 features, G = 2 GCRGs x B = 3 RNA blocks, N = M = 1, r = 16: 433,895 parameters.
Recipe:    batch 16 of 32x32 LR patches (64x64 HR), random flips/rotations, L1, Adam(0.9, 0.999) at 1e-3
           with cosine decay to 0 over the run, no warmup, no EMA; validation on all of Set5 every 1000 steps.
Results:   MODEL_ZOO.md (every number from `python -m rnan_jax.evaluate --checkpoint zoo:small_x2`).
x3, x4:    zoo:small_x3 and zoo:small_x4 continue zoo:small_x2 with --config.model.scale=3 (or 4)
           --config.init_from=zoo:small_x2 --config.total_steps=12000 (x3: 58 minutes, x4: 37); MODEL_ZOO.md.

How it was chosen (measured on these 2 cores; pilots of about 4 minutes each, cosine to 0 within the pilot,
Set5 x2 PSNR at the end, nothing else running):
| pilot | model | patch | steps/s | steps | wall | Set5 |
| --- | --- | --- | --- | --- | --- | --- |
| A | C 32, 2 x 3 (194,417 parameters) | 32 | 5.0 | 1200 | 258 s | 35.096 |
| B | C 48, 2 x 3 (433,895 parameters) | 32 | 2.75 | 530 | 207 s | 34.996 |
| C | C 32, 2 x 3 | 48 | 2.1 | 530 | 261 s | 34.888 |
A 48x48 patch costs 2.3x per step and lost at equal time (C against A), so the patch stays 32. At equal wall
time the wider model (B) was level with A (B reached 34.996 in 80% of A's time), and a run 20 times longer
favours capacity: an earlier orientation run of A's model for 4000 steps ended at SRCNN's level (Set5
36.66), below FSRCNN's 37.05, so B's width was trained for the 90 minutes: 14,000 steps at the 2.7 steps/s
of the time (Set5 37.349, the first zoo:small_x2). Once the CPU step was 3.5x faster, the same recipe ran
36,000 steps in 66 minutes and gained on all three sets (Set5 / Set14 / B100 37.377 / 32.921 / 31.854 against
37.349 / 32.860 / 31.793): that run is zoo:small_x2 now. `num_workers=0` with one read
thread: worker processes cost the 2 cores more than they gave (5.0 steps/s against 2.2-2.6 with 4 workers).
"""
import os

import ml_collections

from rnan_jax import configs
from rnan_jax.env import default_data_dir


def get_config() -> ml_collections.ConfigDict:
    config = configs.default_config()
    config.update(total_steps=36_000, batch_size=16, log_every=200, eval_every=1000, checkpoint_every=1000)
    config.model.update(scale=2, features=48, num_groups=2, num_blocks=3, gc_reduction=16)
    config.optim.update(lr=1e-3, schedule="cosine", warmup_steps=0)
    train = os.path.join(default_data_dir(), "train")
    config.data.update(source="folder", hr_dirs=f"{train}/T91,{train}/BSD200", patch_size=32, num_workers=0,
                       read_threads=1, val_source="benchmark", val_set="Set5", val_max_images=0)
    return config
