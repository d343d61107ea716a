"""Conversion of PyTorch RNAN weights (the layout of ../shared/peers/rnan_torch.py) into rnan_jax parameters."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from rnan_jax.api import param_shapes
from rnan_jax.model import RNANConfig

# Buffers of the PyTorch module that are not parameters here (the mean shift is RNANConfig.rgb_mean).
_BUFFERS = ("mean",)
# Prefixes that wrappers put before every key: nn.DataParallel / DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts save the state_dict inside a larger checkpoint: PyTorch Lightning, BasicSR
# ("params", "params_ema"), EDSR-PyTorch and many others.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net", "params", "params_ema")
# How far (relative) a `mean` buffer may be from RNANConfig.rgb_mean in float32 or as bfloat16/float16 round it
# (`_mean_roundings`): a few float32 units in the last place, for a mean computed rather than typed.
_MEAN_RTOL = 1e-6


def _unwrapped(sd: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return _unwrapped({k[len(prefix):]: v for k, v in sd.items()})
    # the attribute that holds the network in a PyTorch Lightning module ("model.head.weight") or another wrapper
    prefixes = {k[:-len("head.weight")] for k in sd if k.endswith(".head.weight")}
    if "head.weight" not in sd and len(prefixes) == 1:
        prefix = prefixes.pop()
        if all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _state_dict_of(checkpoint: object) -> Mapping:
    """The flat state_dict inside what `torch.load` returned: a whole pickled nn.Module (`torch.save(model)`),
    a checkpoint dict holding it under one of _NESTING_KEYS, or the state_dict itself."""
    if not isinstance(checkpoint, Mapping):
        if callable(getattr(checkpoint, "state_dict", None)):  # torch.save(model): the module itself
            return _state_dict_of(checkpoint.state_dict())
        raise ValueError(f"not a PyTorch state_dict: a {type(checkpoint).__name__}, not a mapping of parameter "
                         "names to tensors")
    nested = [k for k, v in checkpoint.items()
              if isinstance(v, Mapping) or callable(getattr(v, "state_dict", None))]
    if not nested:
        return checkpoint
    found = [k for k in _NESTING_KEYS if k in nested]
    if len(found) == 1:
        return _state_dict_of(checkpoint[found[0]])
    which = found or nested
    raise ValueError(f"a checkpoint with {'several state_dicts' if found else 'nested entries'} "
                     f"({', '.join(map(repr, which[:5]))}): pass the one that holds the weights, e.g. "
                     f"from_torch_state_dict(checkpoint[{which[0]!r}], config)")


def _array(key: str, value: object) -> np.ndarray:
    try:  # .float(): numpy has no bfloat16, the dtype of many half-precision checkpoints
        return np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state_dict: {key} is not a tensor ({type(value).__name__}: {e})") from None


def _mean_roundings(mean: tuple[float, ...]) -> list[np.ndarray]:
    """`mean` as a checkpoint may hold it: in float32, or rounded to bfloat16 or float16 (0.4488 is 0.44921875 in
    bfloat16) by a model cast to that dtype, whether it was saved so or cast back to float32 before saving."""
    import ml_dtypes

    exact = np.asarray(mean, np.float32)
    return [exact] + [exact.astype(low).astype(np.float32) for low in (ml_dtypes.bfloat16, np.float16)]


def from_torch_state_dict(state_dict: Mapping[str, object], config: RNANConfig) -> dict:
    """PyTorch `state_dict` (tensors or arrays) -> rnan_jax parameter tree, float32 numpy arrays.

    `state_dict` may also be what `torch.load` returned for a whole pickled model or for a checkpoint that holds
    the state_dict under "state_dict", "model_state_dict", "model", "net", "params" or "params_ema". Keys may
    carry a DataParallel ("module.") or torch.compile ("_orig_mod.") prefix, or that of the attribute holding
    the network (PyTorch Lightning's "model.") where every key has it. Raises ValueError naming
    the first key that is missing, left over or of the wrong shape for `config`, and for a `mean` buffer that is
    not `config.rgb_mean`, in float32 or as bfloat16 or float16 round it (a bfloat16 checkpoint holds 0.4488 as
    0.44921875; the parameters do not hold the mean: the model would shift by the wrong one)."""
    sd = _unwrapped({k: _array(k, v) for k, v in _state_dict_of(state_dict).items()})
    missing = [k for k in ("head.weight", "tail.weight", "fuse1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an RNAN state_dict: missing {', '.join(missing)} (keys start: "
                         f"{', '.join(list(sd)[:3]) or 'none'})")
    if "mean" in sd and not (sd["mean"].size == 3 and any(
            np.allclose(sd["mean"].ravel(), m, rtol=_MEAN_RTOL, atol=0) for m in _mean_roundings(config.rgb_mean))):
        mean = tuple(float(str(v)) for v in sd["mean"].ravel())  # float32's shortest repr: passed back, it matches
        raise ValueError(f"state_dict: mean is {mean}, but config.rgb_mean is {config.rgb_mean}: pass "
                         f"RNANConfig(..., rgb_mean={mean})")
    shapes = param_shapes(config)
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], *, any_layout: bool = False) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"state_dict: {key} missing (the config has {config.num_groups} groups of "
                             f"{config.num_blocks} blocks, scale {config.scale})")
        value = sd[key]
        if value.shape != shape and not (any_layout and value.size == int(np.prod(shape))):
            raise ValueError(f"state_dict: {key} has shape {value.shape}, expected {shape} for {config}")
        used.add(key)
        return value.reshape(shape)

    def conv(prefix: str, *path: str) -> dict:
        # OIHW -> HWIO; a depthwise [C, 1, 3, 3] becomes [3, 3, 1, C], the layout of feature_group_count=C.
        h, w, i, o = shapes["".join(f"[{k!r}]" for k in (*path, "kernel"))][-4:]
        return {"kernel": np.transpose(take(f"{prefix}.weight", (o, i, h, w)), (2, 3, 1, 0)),
                "bias": take(f"{prefix}.bias", (o,))}

    def group(g: int) -> dict:
        p = f"groups.{g}"
        blocks = [{"c1": conv(f"{p}.blocks.{b}.c1", "groups", "blocks", "c1"),
                   "c2": conv(f"{p}.blocks.{b}.c2", "groups", "blocks", "c2"),
                   "na": {"dc": conv(f"{p}.blocks.{b}.na.dc", "groups", "blocks", "na", "dc"),
                          "pc": conv(f"{p}.blocks.{b}.na.pc", "groups", "blocks", "na", "pc")}}
                  for b in range(config.num_blocks)]
        gc = {name: conv(f"{p}.gc.{name}", "groups", "gc", name) for name in ("k", "v1", "v2")}
        reduced = (config.features // config.gc_reduction,)
        gc["ln"] = {"scale": take(f"{p}.gc.ln.weight", reduced, any_layout=True),  # torch: [C/r, 1, 1]
                    "bias": take(f"{p}.gc.ln.bias", reduced, any_layout=True)}
        return {"blocks": _stack(blocks), "fuse1": conv(f"{p}.fuse1", "groups", "fuse1"),
                "fuse3": conv(f"{p}.fuse3", "groups", "fuse3"), "gc": gc}

    params = {"head": conv("head", "head"), "groups": _stack([group(g) for g in range(config.num_groups)]),
              "fuse1": conv("fuse1", "fuse1"), "fuse3": conv("fuse3", "fuse3"), "tail": conv("tail", "tail")}
    for i in range(len(config.upsample_stages)):
        params[f"up_{i}"] = conv(f"up.{2 * i}", f"up_{i}")  # nn.Sequential(conv, PixelShuffle, conv, PixelShuffle)
    extra = [k for k in sd if k not in used and k not in _BUFFERS]
    if extra:
        raise ValueError(f"state_dict: {extra[0]} is not a parameter of {config}"
                         + (f" ({len(extra) - 1} more keys left over)" if len(extra) > 1 else ""))
    return params


def _stack(trees: list) -> dict:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)
