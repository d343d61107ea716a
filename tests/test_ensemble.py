"""Self-ensemble: the 8 transforms are distinct and undone exactly; equivariant functions are unchanged."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnan_jax.ensemble import NUM_TRANSFORMS, inverse_transform, self_ensemble, transform


def _image(shape=(5, 7, 3), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _nearest_x2(x):
    """Equivariant by construction: pixel-wise nonlinearity, then each pixel repeated into a 2x2 block."""
    xp = jnp if isinstance(x, jax.Array) else np
    y = xp.sqrt(x) * 0.7 + x * x
    return xp.repeat(xp.repeat(y, 2, axis=-3), 2, axis=-2)


@pytest.mark.parametrize("shape", [(5, 7, 3), (2, 5, 7, 3)])
@pytest.mark.parametrize("as_jax", [False, True])
def test_each_transform_is_undone(shape, as_jax):
    x = _image(shape)
    x = jnp.asarray(x) if as_jax else x
    for i in range(NUM_TRANSFORMS):
        np.testing.assert_array_equal(np.asarray(inverse_transform(transform(x, i), i)), np.asarray(x))


def test_transforms_are_the_8_distinct_dihedral_elements():
    x = _image((4, 4, 1))
    outs = [transform(x, i) for i in range(NUM_TRANSFORMS)]
    for a, b in itertools.combinations(outs, 2):
        assert not np.array_equal(a, b)
    # Spot values: index 1 is one counter-clockwise quarter turn, index 4 a left-right mirror.
    np.testing.assert_array_equal(transform(x, 1)[..., 0], np.rot90(x[..., 0]))
    np.testing.assert_array_equal(transform(x, 4)[..., 0], x[:, ::-1, 0])
    assert transform(_image((5, 7, 3)), 1).shape == (7, 5, 3)
    assert transform(_image((2, 5, 7, 3)), 3).shape == (2, 7, 5, 3)


@pytest.mark.parametrize("shape", [(5, 7, 3), (2, 5, 7, 3)])
def test_equivariant_function_is_unchanged(shape):
    x = _image(shape, seed=1)
    np.testing.assert_allclose(self_ensemble(_nearest_x2, x), _nearest_x2(x), rtol=1e-6)
    xj = jnp.asarray(x)
    out = self_ensemble(_nearest_x2, xj)
    assert isinstance(out, jax.Array) and out.shape == _nearest_x2(xj).shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(_nearest_x2(xj)), rtol=1e-6)
    jitted = jax.jit(lambda v: self_ensemble(_nearest_x2, v))
    np.testing.assert_allclose(np.asarray(jitted(xj)), np.asarray(_nearest_x2(xj)), rtol=1e-6)


def test_identity_on_non_square_input_returns_input():
    # Every output is the transformed input; undoing each transform must land on the original.
    x = _image((2, 5, 7, 3), seed=2)
    np.testing.assert_allclose(self_ensemble(lambda v: v, x), x, rtol=1e-6)


def test_position_dependent_function_is_averaged_over_the_group():
    # fn adds the column index j to every pixel. Undone, the 8 transforms add j, W-1-j, i, H-1-i (two each), whose
    # mean on a square image is (W - 1) / 2 everywhere.
    x = _image((6, 6, 3), seed=3)

    def add_column_index(v):
        return v + np.arange(v.shape[-2], dtype=np.float32)[:, None]

    np.testing.assert_allclose(self_ensemble(add_column_index, x), x + 2.5, rtol=1e-6)


def test_integer_outputs_are_averaged_in_float():
    # fn marks the top-left pixel of what it sees with 255. Undone, the 8 marks land on the 4 corners, 2 each.
    x = np.full((4, 5, 1), 10, np.uint8)

    def mark_top_left(v):
        v = v.copy()
        v[0, 0] = 255
        return v

    out = self_ensemble(mark_top_left, x)
    assert out.dtype == np.float32
    expected = np.full((4, 5, 1), 10.0, np.float32)
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = (2 * 255 + 6 * 10) / 8
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_float64_outputs_are_averaged_in_float64():
    # 1 + 2**-30 is not a float32 (its spacing near 1 is 2**-23): a float32 accumulation would return 1.0.
    x = np.full((3, 4, 1), 1.0 + 2.0**-30, np.float64)
    out = self_ensemble(lambda v: v, x)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, x)
