import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax.images import from_uint8, to_uint8


def _pixel(v: float) -> int:
    """Round-to-nearest of (v + 1) * 255 / 2, clamped to [0, 255], in exact rational arithmetic."""
    from fractions import Fraction

    y = (Fraction(v) + 1) * Fraction(255, 2)
    return min(255, max(0, int(y + Fraction(1, 2)) if y >= 0 else 0))


def test_finite_values_round_to_the_nearest_pixel_level():
    # Every level k, and points 0.3 and 0.7 of the way to the next level (never a tie).
    k = np.arange(256)
    levels = np.concatenate([k, k[:-1] + 0.3, k[:-1] + 0.7])
    x = (levels / 127.5 - 1.0).astype(np.float32)
    expected = np.array([_pixel(float(v)) for v in x], np.uint8)
    np.testing.assert_array_equal(expected[:256], k)  # the reference itself: level k is pixel k
    np.testing.assert_array_equal(expected[256:511], k[:-1])
    np.testing.assert_array_equal(expected[511:], k[1:])
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out, expected)


def test_out_of_range_values_are_clipped():
    x = np.array([-5.0, -1.01, 1.01, 3.0, 1e30, -1e30], np.float64)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 255, 255, 255, 0])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_round_trip_through_from_uint8_for_every_pixel_and_dtype(dtype):
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    np.testing.assert_array_equal(to_uint8(jnp.asarray(from_uint8(u), dtype)), u)


@pytest.mark.parametrize("bad", [[np.nan], [np.inf], [-np.inf], [np.nan, np.inf, -np.inf]])
def test_non_finite_values_are_refused_with_a_count(bad):
    x = np.zeros((2, 8, 16, 3), np.float32)  # 768 values
    x.reshape(-1)[[5, 100, 700][:len(bad)]] = bad
    msg = f"^{len(bad)} of 768 values are not finite \\(NaN or inf\\); refusing to convert them to pixels$"
    with pytest.raises(ValueError, match=msg):
        to_uint8(x)
    with pytest.raises(ValueError, match=msg):
        to_uint8(jnp.asarray(x))


def test_three_nans_among_768_values():
    x = np.linspace(-1, 1, 768, dtype=np.float32).reshape(16, 16, 3)
    x[0, 0, 0] = x[3, 4, 1] = x[15, 15, 2] = np.nan
    with pytest.raises(ValueError, match="3 of 768 values are not finite"):
        to_uint8(x)
