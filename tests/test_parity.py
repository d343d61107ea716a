"""Parity with an independent PyTorch reading of the same spec (../shared/peers/rnan_torch.py)."""
import re

import jax
import numpy as np
import pytest

from rnan_jax import RNANConfig, apply, init
from rnan_jax.convert import from_torch_state_dict

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install torch==2.13.0 for the parity test)")


def _compare(torch_rnan, config, lr_shape, seed):
    torch.manual_seed(seed)
    model = torch_rnan(scale=config.scale, c=config.features, n_groups=config.num_groups,
                       n_blocks=config.num_blocks, group_interval=config.group_interval,
                       block_interval=config.block_interval, r=config.gc_reduction).eval()
    params = from_torch_state_dict(model.state_dict(), config)
    expected_tree = jax.eval_shape(lambda k: init(k, config), jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected_tree)
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, expected_tree)
    lr = np.random.RandomState(seed).rand(*lr_shape).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(lr).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda p, x: apply(p, x, scan_unroll=1))(params, lr))
    assert got.shape == expected.shape
    return np.abs(got - expected).max()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_small_config_matches_pytorch(torch_rnan, scale):
    config = RNANConfig(scale=scale, features=32, num_groups=3, num_blocks=4, group_interval=1, block_interval=2)
    assert _compare(torch_rnan, config, (2, 11, 13, 3), seed=scale) < 1e-5


def test_default_config_matches_pytorch_on_tiny_input(torch_rnan):
    assert _compare(torch_rnan, RNANConfig(scale=4), (1, 6, 5, 3), seed=0) < 2e-5


def test_convert_takes_what_torch_load_returns(torch_rnan, tmp_path):
    """A checkpoint dict ({'state_dict': ...}, BasicSR's {'params': ...}), a whole pickled model (also inside
    a dict), Lightning's "model."-prefixed keys convert as the state_dict; a non-tensor entry or an ambiguous
    checkpoint is one ValueError (they were raw TypeErrors and AttributeErrors)."""
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    torch.manual_seed(0)
    model = torch_rnan(scale=2, c=8, n_groups=1, n_blocks=2, r=2).eval()
    sd = model.state_dict()
    expected = from_torch_state_dict(sd, config)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"state_dict": sd, "optimizer": {"state": {}}, "epoch": 3}, tmp_path / "ckpt.pt")
    for checkpoint in [torch.load(tmp_path / "ckpt.pt"), {"params": {"module." + k: v for k, v in sd.items()}},
                       torch.load(tmp_path / "model.pt", weights_only=False),
                       {"model": torch.nn.DataParallel(model), "epoch": 3},
                       {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}]:  # PyTorch Lightning
        jax.tree_util.tree_map(np.testing.assert_array_equal, from_torch_state_dict(checkpoint, config), expected)
    for checkpoint, says in [({"params": sd, "params_ema": sd}, r"several state_dicts \('params', 'params_ema'\)"
                              r": .*checkpoint\['params'\]"),
                             ({**sd, "note": "abc"}, "state_dict: note is not a tensor"),
                             ([sd], "not a PyTorch state_dict: a list")]:
        with pytest.raises(ValueError, match=says):
            from_torch_state_dict(checkpoint, config)


def test_a_mean_buffer_must_be_the_configs_at_the_checkpoints_precision(torch_rnan):
    """A float32 checkpoint whose mean differs from config.rgb_mean by less than 2e-3 (the tolerance meant for
    bfloat16's rounding of 0.4488 to 0.4492) converted silently, the model off from the peer's by that much;
    now only the mean's rounding to the checkpoint's dtype passes, and the mean the error suggests converts to
    the peer's output."""
    import copy

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    torch.manual_seed(0)
    model = torch_rnan(scale=2, c=8, n_groups=1, n_blocks=2, r=2).eval()
    for low in (torch.bfloat16, torch.float16):  # the default mean, rounded to the checkpoint's dtype: accepted
        from_torch_state_dict(copy.deepcopy(model).to(low).state_dict(), config)
    model.mean.copy_(torch.tensor([0.45, 0.4371, 0.4040]).view(1, 3, 1, 1))  # 1.2e-3 off the default
    with pytest.raises(ValueError, match=r"mean is \(0\.45, 0\.4371, 0\.404\).*rgb_mean=\(0\.45, 0\.4371, 0\.404\)"):
        from_torch_state_dict(model.state_dict(), config)
    config = RNANConfig(**{**config.__dict__, "rgb_mean": (0.45, 0.4371, 0.404)})
    params = from_torch_state_dict(model.state_dict(), config)
    lr = np.random.RandomState(0).rand(1, 7, 9, 3).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(lr).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(jax.jit(lambda p, x: apply(p, x, config=config))(params, lr)) - expected).max() < 1e-5


def test_a_conv_kernel_of_the_right_size_in_another_layout_is_refused(torch_rnan):
    """Only the GC block's LayerNorm ([C/r, 1, 1] in torch) converts from another shape of its size (a flat [C/r]); a
    conv kernel of the right size in another layout (HWIO, as a JAX or TensorFlow port holds it) would be reshaped
    into scrambled weights without a word: it is refused naming the key and both shapes."""
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    torch.manual_seed(0)
    sd = torch_rnan(scale=2, c=8, n_groups=1, n_blocks=2, r=2).state_dict()
    expected = from_torch_state_dict(sd, config)
    flat = {**sd, "groups.0.gc.ln.weight": sd["groups.0.gc.ln.weight"].flatten(),
            "groups.0.gc.ln.bias": sd["groups.0.gc.ln.bias"].flatten()}
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_torch_state_dict(flat, config), expected)
    np.testing.assert_array_equal(expected["groups"]["gc"]["ln"]["scale"][0], sd["groups.0.gc.ln.weight"].flatten())
    for key, layout, shape in [("head.weight", (2, 3, 1, 0), r"\(3, 3, 3, 8\), expected \(8, 3, 3, 3\)"),
                               ("groups.0.blocks.1.c1.weight", (0, 1, 3, 2), None),  # a kernel's h and w swapped
                               ("groups.0.gc.v1.weight", (1, 0, 2, 3), r"\(8, 4, 1, 1\), expected \(4, 8, 1, 1\)")]:
        moved = {**sd, key: sd[key].permute(*layout)}
        if shape is None:  # same shape: converted as given (no way to tell), and the numbers follow the tensor
            kernel = from_torch_state_dict(moved, config)["groups"]["blocks"]["c1"]["kernel"][0, 1]
            np.testing.assert_array_equal(kernel, sd[key].numpy().transpose(3, 2, 1, 0))
            continue
        with pytest.raises(ValueError, match=rf"state_dict: {re.escape(key)} has shape {shape} for "):
            from_torch_state_dict(moved, config)
