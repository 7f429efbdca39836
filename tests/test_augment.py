"""Separable warps against numpy pixel operations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import augment


def _images(shape, seed=0):
  # Strictly positive, so a zero pixel can only come from the padding.
  return np.random.default_rng(seed).uniform(0.1, 1.0, size=shape).astype(np.float32)


def _sources(m):
  """For a one-hot [out, in] matrix: [(out index, in index)] of its non-zero rows."""
  m = np.asarray(m)
  assert set(np.unique(m)) <= {0.0, 1.0} and np.all(m.sum(axis=1) <= 1)
  return [(i, int(np.argmax(m[i]))) for i in range(m.shape[0]) if m[i].any()]


def _offset_and_flip(m, size):
  """Recovers (offset, flip) of out[i] = in[(i or size-1-i) + offset] from a matrix."""
  src = _sources(m)
  (i0, s0), (i1, s1) = src[0], src[1]
  flip = (s1 - s0) * (i1 - i0) < 0
  offset = s0 - (size - 1 - i0 if flip else i0)
  return offset, flip


def _np_crop_flip(x, oy, ox, flip, pad):
  """RandomCrop(size, padding=pad) at offsets (oy, ox) in [-pad, pad], then flip."""
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = xp[:, pad + oy:pad + oy + h, pad + ox:pad + ox + w]
  return out[:, :, ::-1] if flip else out


def _np_bilinear_1d(v, start, length, size_out):
  """F.interpolate(mode='bilinear', align_corners=False) of v[start:start+length] along
  axis 0, written per output sample."""
  crop = v[start:start + length]
  out = []
  for i in range(size_out):
    src = max((i + 0.5) * length / size_out - 0.5, 0.0)
    lo = int(np.floor(src))
    hi = lo + 1 if lo < length - 1 else lo
    lam = src - lo
    out.append((1 - lam) * crop[lo] + lam * crop[hi])
  return np.stack(out)


def _np_resized_crop(x, top, left, ch, cw, flip):
  """One image [H, W, C]: crop, bilinear resize back to [H, W], optional flip."""
  h, w, _ = x.shape
  y = _np_bilinear_1d(x, top, ch, h)                          # rows
  y = _np_bilinear_1d(y.transpose(1, 0, 2), left, cw, w).transpose(1, 0, 2)  # cols
  return y[:, ::-1] if flip else y


# ---------------------------------------------------------------- crop + flip

def test_crop_flip_equals_numpy_crop():
  b, h, w, pad = 48, 8, 6, 2
  x = _images((b, h, w, 2))
  warp = augment.crop_flip(jax.random.key(0), b, (h, w), pad)
  y = np.asarray(augment.apply_warp(jnp.asarray(x), warp))
  seen = set()
  for i in range(b):
    oy, row_flip = _offset_and_flip(warp.rows[i], h)
    ox, flip = _offset_and_flip(warp.cols[i], w)
    assert not row_flip and -pad <= oy <= pad and -pad <= ox <= pad
    np.testing.assert_array_equal(y[i], _np_crop_flip(x[i:i + 1], oy, ox, flip, pad)[0])
    seen.add((oy, ox, flip))
  # Per-sample draws cover the range.
  assert {s[0] for s in seen} == set(range(-pad, pad + 1))
  assert {s[2] for s in seen} == {False, True}
  # No flip requested: never flipped.
  warp = augment.crop_flip(jax.random.key(1), b, (h, w), pad, flip=False)
  assert not any(_offset_and_flip(warp.cols[i], w)[1] for i in range(b))


def test_crop_flip_identity():
  x = _images((3, 5, 7, 2))
  warp = augment.crop_flip(jax.random.key(0), 3, (5, 7), 0, flip=False)
  np.testing.assert_array_equal(augment.apply_warp(jnp.asarray(x), warp), x)


# ---------------------------------------------------------------- resized crop

@pytest.mark.parametrize('start, length, size_out, size_in', [
    (0, 8, 8, 8), (2, 5, 8, 8), (3, 1, 8, 8), (0, 3, 7, 9), (1, 12, 5, 16)])
def test_bilinear_matrix_equals_numpy(start, length, size_out, size_in):
  m = augment._bilinear_matrix(jnp.array([start]), jnp.array([length]), size_out, size_in)[0]
  v = _images((size_in, 3), seed=start + length)
  expected = _np_bilinear_1d(v, start, length, size_out)
  np.testing.assert_allclose(np.asarray(m) @ v, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.torch
def test_bilinear_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  x = _images((1, 2, 9, 10))  # NCHW for torch
  top, left, ch, cw = 2, 3, 5, 4
  ref = torch.nn.functional.interpolate(torch.from_numpy(x[:, :, top:top + ch, left:left + cw]),
                                        size=(9, 10), mode='bilinear', align_corners=False)
  rows = augment._bilinear_matrix(jnp.array([top]), jnp.array([ch]), 9, 9)
  cols = augment._bilinear_matrix(jnp.array([left]), jnp.array([cw]), 10, 10)
  y = augment.apply_warp(jnp.asarray(x.transpose(0, 2, 3, 1)), augment.Warp(rows, cols))
  np.testing.assert_allclose(y, ref.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_resized_crop_flip_equals_numpy():
  b, h, w = 16, 9, 8
  x = _images((b, h, w, 2), seed=1)
  warp = augment.resized_crop_flip(jax.random.key(3), b, (h, w))
  y = np.asarray(augment.apply_warp(jnp.asarray(x), warp))
  crops = set()
  for i in range(b):
    # The crop is the support of the resampling weights.
    r = np.flatnonzero(np.asarray(warp.rows[i]).any(axis=0))
    c = np.flatnonzero(np.asarray(warp.cols[i]).any(axis=0))
    top, ch, left, cw = r[0], len(r), c[0], len(c)
    assert r[-1] - r[0] + 1 == ch and c[-1] - c[0] + 1 == cw
    assert 0.25 * h * w * 0.5 <= ch * cw  # area scale >= 0.25 (up to rounding)
    outs = [_np_resized_crop(x[i], top, left, ch, cw, f) for f in (False, True)]
    errs = [np.max(np.abs(y[i] - o)) for o in outs]
    assert min(errs) < 1e-5, errs
    crops.add((top, left, ch, cw, int(np.argmin(errs))))
  assert len(crops) > b // 2  # per-sample parameters
  assert {c[-1] for c in crops} == {0, 1}


def test_resized_crop_identity():
  x = _images((2, 6, 6, 3))
  warp = augment.resized_crop_flip(jax.random.key(0), 2, (6, 6), scale=(1.0, 1.0),
                                   ratio=(1.0, 1.0), flip=False)
  np.testing.assert_array_equal(augment.apply_warp(jnp.asarray(x), warp), x)


# ---------------------------------------------------------------- roll

def _roll_and_flip(m, size):
  """(shift, flip) of out[i] = in[(i - shift) mod size], flipped output if flip."""
  src = dict(_sources(m))
  assert len(src) == size
  flip = (src[1] - src[0]) % size != 1
  shift = ((size - 1 if flip else 0) - src[0]) % size
  return (shift + size // 2) % size - size // 2, flip  # signed


@pytest.mark.parametrize('per_sample', [False, True])
def test_roll_flip_equals_np_roll(per_sample):
  b, h, w, m = 12, 8, 8, 2
  x = _images((b, h, w, 2))
  warp = augment.roll_flip(jax.random.key(5), b, (h, w), (m, m), per_sample=per_sample)
  y = np.asarray(augment.apply_warp(jnp.asarray(x), warp))
  draws = set()
  for i in range(b):
    sy, row_flip = _roll_and_flip(warp.rows[i], h)
    sx, flip = _roll_and_flip(warp.cols[i], w)
    assert not row_flip and abs(sy) <= m and abs(sx) <= m
    expected = np.roll(x[i], (sy, sx), axis=(0, 1))
    np.testing.assert_array_equal(y[i], expected[:, ::-1] if flip else expected)
    draws.add((sy, sx, flip))
  assert (len(draws) == 1) == (not per_sample)


# ---------------------------------------------------------------- warp algebra

def test_apply_warp_gradient_is_transposed_warp():
  b, h, w = 3, 7, 6
  x = jnp.asarray(_images((b, h, w, 2)))
  g = np.random.default_rng(1).normal(size=(b, h, w, 2)).astype(np.float32)
  warp = augment.resized_crop_flip(jax.random.key(2), b, (h, w))
  grad = jax.grad(lambda x_: jnp.sum(augment.apply_warp(x_, warp) * g))(x)
  rows, cols = np.asarray(warp.rows, np.float64), np.asarray(warp.cols, np.float64)
  expected = np.einsum('bih,bijc,bjw->bhwc', rows, g, cols)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_normalize_and_to_float():
  x = np.array([[[[0.0, 0.5, 1.0]]]], np.float32)
  mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
  expected = (x - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(augment.normalize(jnp.asarray(x), mean, std), expected, rtol=1e-6)
  assert augment.normalize(jnp.asarray(x, jnp.bfloat16), mean, std).dtype == jnp.bfloat16
  u = np.array([0, 51, 255], np.uint8)
  np.testing.assert_allclose(augment.to_float(jnp.asarray(u)), [0.0, 0.2, 1.0], rtol=1e-7)


def test_standard_train_view_on_uint8():
  b, h, w, pad = 8, 6, 6, 2
  images = np.random.default_rng(4).integers(1, 256, size=(b, h, w, 1), dtype=np.uint8)
  mean, std = (0.2860,), (0.3530,)
  rng = jax.random.key(9)
  y = np.asarray(augment.standard_train_view(rng, jnp.asarray(images), pad, True, mean, std))
  warp = augment.crop_flip(rng, b, (h, w), pad, True)  # the same draws
  for i in range(b):
    oy, _ = _offset_and_flip(warp.rows[i], h)
    ox, flip = _offset_and_flip(warp.cols[i], w)
    crop = _np_crop_flip(images[i:i + 1].astype(np.float64) / 255.0, oy, ox, flip, pad)[0]
    np.testing.assert_allclose(y[i], (crop - mean[0]) / std[0], rtol=1e-5, atol=1e-5)
  # Padding is black before normalization.
  assert np.isclose(y.min(), -mean[0] / std[0], atol=1e-5)
