"""Per-sample differentiable image augmentations, as separable linear maps.

Every augmentation used here (crop with zero padding, horizontal flip, random
resized crop with bilinear resampling, circular roll) moves pixels along rows
and columns independently, so it is y[b] = R_y[b] @ x[b] @ R_x[b]^T per
channel with small [out, in] matrices per sample. One einsum applies any of
them to a batch, on device, under jit, for any image size and channel count,
and gradients flow to the pixels (the synthesis views need that). Integer
crops and flips use one-hot matrices, so they are exact.

All functions take NHWC float images in [0, 1] (before normalization).
"""

from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp


class Warp(NamedTuple):
  """Separable per-sample warp: rows [B, H_out, H_in], cols [B, W_out, W_in]."""
  rows: jax.Array
  cols: jax.Array


def apply_warp(x: jax.Array, warp: Warp) -> jax.Array:
  """y[b, i, j, c] = sum_{h, w} rows[b, i, h] * x[b, h, w, c] * cols[b, j, w]."""
  t = jnp.einsum('bhwc,bjw->bhjc', x, warp.cols.astype(x.dtype))
  return jnp.einsum('bih,bhjc->bijc', warp.rows.astype(x.dtype), t)


def _shift_matrix(offset: jax.Array, size_out: int, size_in: int) -> jax.Array:
  """[B, out, in] one-hot: out[i] = in[i + offset] (zeros outside the image)."""
  src = jnp.arange(size_out)[None, :] + offset[:, None]
  return jax.nn.one_hot(src, size_in, dtype=jnp.float32)  # out-of-range -> zero row


def _maybe_flip(m: jax.Array, flip: jax.Array) -> jax.Array:
  """Reverses the output axis of [B, out, in] where flip[b]."""
  return jnp.where(flip[:, None, None], m[:, ::-1, :], m)


def crop_flip(rng: jax.Array, batch: int, size: Tuple[int, int], padding: int,
              flip: bool = True) -> Warp:
  """Random crop of the original size from the zero-padded image + horizontal flip.

  Matches RandomCrop(size, padding) + RandomHorizontalFlip(), each sample with
  its own offsets and coin.
  """
  h, w = size
  k_y, k_x, k_f = jax.random.split(rng, 3)
  oy = jax.random.randint(k_y, (batch,), 0, 2 * padding + 1) - padding
  ox = jax.random.randint(k_x, (batch,), 0, 2 * padding + 1) - padding
  rows = _shift_matrix(oy, h, h)
  cols = _shift_matrix(ox, w, w)
  if flip:
    cols = _maybe_flip(cols, jax.random.bernoulli(k_f, 0.5, (batch,)))
  return Warp(rows, cols)


def _bilinear_matrix(start: jax.Array, length: jax.Array, size_out: int,
                     size_in: int) -> jax.Array:
  """[B, out, in] bilinear resampling of in[start:start+length] to `size_out`
  samples (align_corners=False, edge-clamped: F.interpolate's convention)."""
  start = start.astype(jnp.float32)[:, None]
  length = length.astype(jnp.float32)[:, None]
  i = jnp.arange(size_out, dtype=jnp.float32)[None, :]
  src = jnp.maximum((i + 0.5) * length / size_out - 0.5, 0.0)
  i0 = jnp.floor(src)
  frac = src - i0
  i1 = jnp.minimum(i0 + 1.0, length - 1.0)
  m0 = jax.nn.one_hot((start + i0).astype(jnp.int32), size_in, dtype=jnp.float32)
  m1 = jax.nn.one_hot((start + i1).astype(jnp.int32), size_in, dtype=jnp.float32)
  return (1.0 - frac)[..., None] * m0 + frac[..., None] * m1


def resized_crop_flip(rng: jax.Array, batch: int, size: Tuple[int, int],
                      scale: Sequence[float] = (0.25, 1.0),
                      ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                      flip: bool = True) -> Warp:
  """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(), per sample.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the crop sides are
  rounded and clipped to the image (torchvision instead retries up to 10 times
  before a center-crop fallback: clipping keeps it one vectorized draw).
  """
  h, w = size
  k_s, k_r, k_y, k_x, k_f = jax.random.split(rng, 5)
  area = jax.random.uniform(k_s, (batch,), minval=scale[0], maxval=scale[1]) * h * w
  log_r = jax.random.uniform(k_r, (batch,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  r = jnp.exp(log_r)
  cw = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1, w).astype(jnp.int32)
  ch = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1, h).astype(jnp.int32)
  top = jnp.floor(jax.random.uniform(k_y, (batch,)) * (h - ch + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x, (batch,)) * (w - cw + 1)).astype(jnp.int32)
  rows = _bilinear_matrix(top, ch, h, h)
  cols = _bilinear_matrix(left, cw, w, w)
  if flip:
    cols = _maybe_flip(cols, jax.random.bernoulli(k_f, 0.5, (batch,)))
  return Warp(rows, cols)


def _roll_matrix(shift: jax.Array, size: int) -> jax.Array:
  """[B, size, size] one-hot: out[i] = in[(i - shift) mod size] (jnp.roll)."""
  src = jnp.mod(jnp.arange(size)[None, :] - shift[:, None], size)
  return jax.nn.one_hot(src, size, dtype=jnp.float32)


def roll_flip(rng: jax.Array, batch: int, size: Tuple[int, int], max_shift: Tuple[int, int],
              flip: bool = True, per_sample: bool = False) -> Warp:
  """Random circular shift by up to max_shift pixels + horizontal flip (DeepInversion jitter).

  per_sample=False draws one shift/flip for the whole batch, as the reference
  DeepInversion does (torch.roll on the batch).
  """
  h, w = size
  k_y, k_x, k_f = jax.random.split(rng, 3)
  n = batch if per_sample else 1
  sy = jax.random.randint(k_y, (n,), -max_shift[0], max_shift[0] + 1)
  sx = jax.random.randint(k_x, (n,), -max_shift[1], max_shift[1] + 1)
  rows = _roll_matrix(sy, h)
  cols = _roll_matrix(sx, w)
  if flip:
    cols = _maybe_flip(cols, jax.random.bernoulli(k_f, 0.5, (n,)))
  if not per_sample:
    rows = jnp.broadcast_to(rows, (batch, h, h))
    cols = jnp.broadcast_to(cols, (batch, w, w))
  return Warp(rows, cols)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(x - mean) / std per channel; x in [0, 1], NHWC. Float inputs keep their
  dtype (bfloat16 stays bfloat16); integer inputs give float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  out = (x.astype(jnp.float32) - mean) / std
  return out.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else out


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; float inputs pass through as float32."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def standard_train_view(rng: jax.Array, images: jax.Array, padding: int, flip: bool,
                        mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """The datasets' standard training augmentation: crop with padding + flip,
  then normalize. images: [B, H, W, C] uint8 or float in [0, 1]."""
  x = to_float(images)
  warp = crop_flip(rng, x.shape[0], x.shape[1:3], padding, flip)
  return normalize(apply_warp(x, warp), mean, std)
