"""Per-tap pieces of the CPU explicit-gradient convolutions, and the depthwise conv.

`windows`, `input_grad_pads` and the three filter gradients (`filter_grad_as_conv`,
`filter_grad_shift_g`, `filter_grad_windows`; which serves which conv: see
`layers._conv_bwd`) serve every explicit-gradient conv of `cmi_jax.models.layers`.
`depthwise_conv2d` is the CPU path of a depthwise conv (PyTorch groups == C_in ==
C_out, MobileNetV2's and ShuffleNetV2's 3x3 convs):
XLA:CPU runs a depthwise `conv_general_dilated` far below memory speed (measured on
MobileNetV2's and ShuffleNetV2's shapes, jax 0.12: 2-50x slower than this for the
forward, 12-50x with both gradients, 17x and more inside a scan;
benchmarks/grouped_conv_speed.py), while a depthwise conv is only kh*kw shifted
elementwise multiply-adds, which XLA fuses into one pass over the data; both
gradients are the same kind of sums. Same products as XLA's conv, summed in
float32 (float64 for float64 inputs) in another order (rounding apart).
"""

import functools
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def windows(xp: jax.Array, kh: int, kw: int, ho: int, wo: int, stride: int) -> List[jax.Array]:
  """The kh*kw strided [N, ho, wo, C] views of the padded input, one per kernel tap."""
  n, c = xp.shape[0], xp.shape[-1]
  return [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                    (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]


def input_grad_pads(x, kernel, g, stride, padding) -> List[Tuple[int, int]]:
  """Padding of the (stride-dilated) g that makes the input gradient a forward conv."""
  pads = []
  for size, k, o in ((x.shape[1], kernel.shape[0], g.shape[1]),
                     (x.shape[2], kernel.shape[1], g.shape[2])):
    lo = k - 1 - padding
    pads.append((lo, size + k - 1 - ((o - 1) * stride + 1) - lo))
  return pads


def is_depthwise(kernel: jax.Array, groups: int) -> bool:
  """Whether an HWIO kernel with PyTorch `groups` is a depthwise conv (one input and
  one output channel per group). Channel multipliers (C_out = m C_in) are not."""
  return groups > 1 and kernel.shape[2] == 1 and kernel.shape[3] == groups


def _pad_hw(x: jax.Array, pads: Sequence[Tuple[int, int]], interior: int = 0) -> jax.Array:
  (t, b), (l, r) = pads
  return lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (t, b, interior), (l, r, interior), (0, 0, 0)))


def _acc_dtype(dtype):
  """float32 for float32 and narrower inputs, float64 for float64 (x64 mode)."""
  return jnp.promote_types(dtype, jnp.float32)


def _shift_mac(xp: jax.Array, taps: jax.Array, ho: int, wo: int, stride: int) -> jax.Array:
  """sum over taps (i, j) of window_ij(xp) * taps[i, j], at least in float32: taps [kh, kw, C]."""
  kh, kw = taps.shape[:2]
  acc_t = _acc_dtype(xp.dtype)
  acc = None
  for t, w in enumerate(windows(xp, kh, kw, ho, wo, stride)):
    term = w.astype(acc_t) * taps[t // kw, t % kw].astype(acc_t)
    acc = term if acc is None else acc + term
  return acc


def _out_hw(x, kernel, stride, padding):
  return tuple((x.shape[1 + a] + 2 * padding - kernel.shape[a]) // stride + 1 for a in (0, 1))


def _forward(x, kernel, stride, padding):
  ho, wo = _out_hw(x, kernel, stride, padding)
  xp = _pad_hw(x, [(padding, padding)] * 2)
  return _shift_mac(xp, kernel[:, :, 0], ho, wo, stride).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, stride, padding):
  return _forward(x, kernel, stride, padding)


def _depthwise_fwd(x, kernel, stride, padding):
  return _forward(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, res, g):
  """dx: the stride-dilated g, padded, shift-multiply-added with the flipped taps;
  dk[i, j, c]: sum over N, H, W of window_ij(x)[..., c] * g[..., c]."""
  x, kernel = res
  kh, kw = kernel.shape[:2]
  with jax.named_scope('conv_input_grad'):  # the names the speed profiles go by
    gd = _pad_hw(g, input_grad_pads(x, kernel, g, stride, padding), stride - 1)
    dx = _shift_mac(gd, jnp.flip(kernel[:, :, 0], (0, 1)), x.shape[1], x.shape[2], 1)
  with jax.named_scope('conv_filter_grad'):
    xp = _pad_hw(x, [(padding, padding)] * 2)
    acc_t = _acc_dtype(g.dtype)
    gf = g.astype(acc_t)
    dk = jnp.stack([jnp.sum(w.astype(acc_t) * gf, axis=(0, 1, 2))
                    for w in windows(xp, kh, kw, g.shape[1], g.shape[2], stride)])
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Depthwise NHWC conv, kernel HWIO [kh, kw, 1, C], symmetric explicit padding
  (PyTorch Conv2d(C, C, k, stride, padding, groups=C)), with its explicit gradients."""
  if kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f'depthwise_conv2d needs a [kh, kw, 1, C] kernel for C={x.shape[-1]} '
                     f'input channels, got {kernel.shape}.')
  return _depthwise(x, kernel, stride, padding)


def filter_grad_windows(xp, g, kh, kw, stride):
  """Filter gradient as kh*kw matmuls, one per tap: dk[i, j] = window_ij(xp)^T g over
  all N, H_out, W_out (the strided window of the padded input that tap (i, j) reads)."""
  ci, co = xp.shape[-1], g.shape[-1]
  g2 = g.reshape(-1, co)
  taps = [jnp.dot(sl.reshape(-1, ci).T, g2, preferred_element_type=jnp.float32)
          for sl in windows(xp, kh, kw, g.shape[1], g.shape[2], stride)]
  return jnp.stack(taps).reshape(kh, kw, ci, co)


def filter_grad_as_conv(xp, g):
  """Stride-1 filter gradient as ONE canonical NHWC/HWIO forward convolution.

  dk[i, j, c, o] = sum_{n,h,w} xp[n, h + i, w + j, c] g[n, h, w, o] is a forward conv
  whose batch is C_in, whose input channels are the samples N and whose kernel is g
  ([H_out, W_out, N, C_out]); its output is [C_in, kh, kw, C_out]. Only the explicit
  transposes make it the canonical layout: XLA's own filter-gradient conv (the same
  sum with swapped dimension numbers) takes the slow path inside loops (layers._conv_bwd).
  """
  # The barrier makes XLA transpose the materialized xp and g. Without it, XLA fuses
  # their producers (the BN / ReLU recompute that gives x, the BN backward that gives g)
  # into the transposing loop, which then gathers at a stride of a whole sample: the KD
  # step at 32x32x3 B=128 spent ~33 ms of ~215 there. With it: KD step x0.83 there,
  # x0.94 at B=64, 28x28x1 x0.99-1.01, synthesis x0.97-1.0 (one process, speed_log).
  xp, g = lax.optimization_barrier((xp, g))
  out = lax.conv_general_dilated(xp.transpose(3, 1, 2, 0),
                                 g.transpose(1, 2, 0, 3).astype(xp.dtype), (1, 1), ((0, 0), (0, 0)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                 preferred_element_type=jnp.float32)
  return out.transpose(1, 2, 0, 3)


def filter_grad_shift_g(xp, g, kh, kw):
  """Stride-1 filter gradient that shifts g instead of x (cheapest when C_out < C_in / 4).

  dk[i, j] = sum_p xp[p + (i, j)]^T g[p] = sum_q xp[q]^T g_ij[q], with g_ij = g
  placed at offset (i, j) in xp's frame (zeros elsewhere): the kh*kw shifted
  copies are of the narrow g, and all taps are one matmul [C_in, kh*kw*C_out].
  """
  n, hp, wp, ci = xp.shape
  _, ho, wo, co = g.shape
  shifted = [jnp.pad(g, ((0, 0), (i, hp - ho - i), (j, wp - wo - j), (0, 0)))
             for i in range(kh) for j in range(kw)]
  g_all = jnp.concatenate(shifted, axis=-1).reshape(-1, kh * kw * co)
  dk = jnp.dot(xp.reshape(-1, ci).T, g_all, preferred_element_type=jnp.float32)
  return dk.reshape(ci, kh, kw, co).transpose(1, 2, 0, 3)

