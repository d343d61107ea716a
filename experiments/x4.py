"""RNAN x4, the paper's recipe (section 3.1 as ../shared/DESIGN.md reads it).

Command:   python -m rnan_jax.train --config experiments/x4.py --workdir runs/x4
           (x3/x2 likewise; to start x4 from an x2 run: --config.init_from=runs/x2)
Hardware:  one GPU (H100/H200) or a Cloud TPU VM; the batch is sharded over all devices of all hosts
           (multi-host: add --distributed). See tools/BENCHMARKS.md for the step time.
Data:      DIV2K 800 training images through TFDS (div2k/bicubic_x4 as array_record, see the README);
           validation on Set5 from $RNAN_DATA_DIR/benchmark.
Model:     10 GCRGs x 20 RNA blocks, 64 features, N = M = 1, r = 16: 17,303,749 parameters.
Recipe:    batch 16 of 48x48 LR patches, L1, Adam(0.9, 0.999), lr 1e-4 halved every 200k steps, 1M steps.
Target (the paper's Table 1, RNAN x4; not reproduced here, no full run was possible on these machines):
           Set5 32.52/.8986, Set14 28.82/.7872, B100 27.72/.7418, Urban100 26.67/.8049 (PSNR/SSIM, Y);
           RNAN+ (self-ensemble) Set5 32.66/.9005.
"""
import ml_collections

from rnan_jax import configs


def get_config() -> ml_collections.ConfigDict:
    return configs.paper_config(4)
