"""Conversion of PyTorch RNAN weights (the layout of ../shared/peers/rnan_torch.py) into rnan_jax parameters."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from rnan_jax.model import RNANConfig


def _conv(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
    # OIHW -> HWIO; a depthwise [C, 1, 3, 3] becomes [3, 3, 1, C], the layout of feature_group_count=C.
    return {"kernel": np.transpose(np.asarray(sd[f"{prefix}.weight"]), (2, 3, 1, 0)),
            "bias": np.asarray(sd[f"{prefix}.bias"])}


def _stack(trees: list) -> dict:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def from_torch_state_dict(state_dict: Mapping[str, object], config: RNANConfig) -> dict:
    """PyTorch `state_dict` (tensors or arrays) -> rnan_jax parameter tree, float32 numpy arrays."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
          for k, v in state_dict.items()}
    missing = [k for k in ("head.weight", "tail.weight", "fuse1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an RNAN state_dict: missing {', '.join(missing)}")

    def group(g: int) -> dict:
        p = f"groups.{g}"
        blocks = [{"c1": _conv(sd, f"{p}.blocks.{b}.c1"), "c2": _conv(sd, f"{p}.blocks.{b}.c2"),
                   "na": {"dc": _conv(sd, f"{p}.blocks.{b}.na.dc"), "pc": _conv(sd, f"{p}.blocks.{b}.na.pc")}}
                  for b in range(config.num_blocks)]
        gc = {name: _conv(sd, f"{p}.gc.{name}") for name in ("k", "v1", "v2")}
        gc["ln"] = {"scale": sd[f"{p}.gc.ln.weight"].reshape(-1), "bias": sd[f"{p}.gc.ln.bias"].reshape(-1)}
        return {"blocks": _stack(blocks), "fuse1": _conv(sd, f"{p}.fuse1"), "fuse3": _conv(sd, f"{p}.fuse3"),
                "gc": gc}

    params = {"head": _conv(sd, "head"), "groups": _stack([group(g) for g in range(config.num_groups)]),
              "fuse1": _conv(sd, "fuse1"), "fuse3": _conv(sd, "fuse3"), "tail": _conv(sd, "tail")}
    for i in range(len(config.upsample_stages)):
        params[f"up_{i}"] = _conv(sd, f"up.{2 * i}")  # nn.Sequential(conv, PixelShuffle, conv, PixelShuffle)
    return params
