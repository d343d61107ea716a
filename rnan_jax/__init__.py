"""rnan_jax: RNAN single-image super-resolution (Ai et al.) in JAX/Flax.

    from rnan_jax import RNANConfig, init, apply
    params = init(jax.random.key(0), RNANConfig(scale=4))
    sr = apply(params, lr)            # lr float32 in [0, 1], [B, h, w, 3] or [h, w, 3]

Importing this package defines no flags and touches no device.
"""
from rnan_jax.model import RNANConfig
from rnan_jax.api import apply, infer_config, init

__all__ = ["RNANConfig", "init", "apply", "infer_config", "load", "upscale_image"]


def __getattr__(name):
    # Checkpointing (orbax) and inference are imported only when asked for, to keep `import rnan_jax` light.
    if name == "load":
        from rnan_jax.checkpoint import load

        return load
    if name == "upscale_image":
        from rnan_jax.inference import upscale_image

        return upscale_image
    raise AttributeError(f"module 'rnan_jax' has no attribute {name!r}")
