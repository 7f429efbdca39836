"""Building blocks shared by the model zoo: PyTorch-compatible conv and BN.

Both mirror PyTorch semantics so that converted reference checkpoints give the
same logits: convolutions pad explicitly and symmetrically (Flax 'SAME' pads a
stride-2 3x3 conv by (0, 1), PyTorch by (1, 1)); BatchNorm uses eps 1e-5 and
updates its running variance with the unbiased batch variance, as PyTorch does.

BatchNorm also records, when the 'taps' collection is mutable, the statistics
of its *input* (per-sample spatial mean and variance, plus its running stats):
this is how the teacher exposes what L_bn and the contrastive features need,
without PyTorch-style hooks (see `cmi_jax.teacher`).
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cmi_jax.models.conv_taps import depthwise_conv2d, is_depthwise
from cmi_jax.models.conv_taps import input_grad_pads as _input_grad_pads
from cmi_jax.models.conv_taps import filter_grad_as_conv as _filter_grad_as_conv
from cmi_jax.models.conv_taps import filter_grad_shift_g as _filter_grad_shift_g
from cmi_jax.models.conv_taps import filter_grad_windows as _filter_grad_windows
from cmi_jax.models.conv_taps import windows as _windows
from cmi_jax.models.norm_ops import batch_norm_train, sample_moments

Dtype = Any
Initializer = Callable[..., jax.Array]

TAPS = 'taps'  # the mutable collection that BN inputs and features are sown into

# PyTorch's default init for conv/linear weights: kaiming_uniform(a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# kaiming_normal(mode='fan_out', nonlinearity='relu'), used by the reference nets.
he_fan_out_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BNTap(NamedTuple):
  """What one BN layer saw: statistics of its input, per sample, in float32.

  mean, var: [N, C] spatial mean and (biased) spatial variance of each sample.
  running_mean, running_var: [C] the layer's stored statistics.
  The batch statistics of any subset of rows follow exactly (law of total
  variance), so one teacher call on [global; local] views serves both L_bn (on
  the global rows) and the contrastive features (means of all rows).
  """
  mean: jax.Array
  var: jax.Array
  running_mean: jax.Array
  running_var: jax.Array


def input_tap(x: jax.Array, running_mean: jax.Array, running_var: jax.Array) -> BNTap:
  """The BNTap of a BN layer's input x: [N, ..., C] (channels last), in float32.

  Mean and biased variance per sample over the axes between N and C (H, W for
  images; none for [N, C] features, whose variance per sample is then 0, which
  keeps the batch statistics of `subset_batch_stats` exact).
  """
  xf = x.astype(jnp.float32)
  axes = tuple(range(1, xf.ndim - 1))
  if not axes:
    return BNTap(xf, jnp.zeros_like(xf), running_mean, running_var)
  if one_pass_bn():
    m, v = sample_moments(xf)                                             # [N, C] each
  else:
    m = jnp.mean(xf, axis=axes)
    v = jnp.mean(jnp.square(xf - jnp.expand_dims(m, axes)), axis=axes)
  return BNTap(m, v, running_mean, running_var)


def one_pass_bn() -> bool:
  """Whether BN statistics use norm_ops' one-pass VJPs: on the CPU, where BN's memory
  passes are its cost (measured there: KD step x0.93-0.97, synthesis x0.95-0.98); GPU
  and TPU keep the textbook forms, which XLA fuses there (unmeasured: unchanged)."""
  return jax.default_backend() == 'cpu'


def spatial_mean(x: jax.Array) -> jax.Array:
  """Per-sample mean over H, W in float32: [N, H, W, C] -> [N, C]."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _xla_conv(x, kernel, stride, padding, groups=1):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_explicit_grad(x, kernel, stride, padding, groups=1):
  return _xla_conv(x, kernel, stride, padding, groups)


def _conv_fwd(x, kernel, stride, padding, groups=1):
  return _xla_conv(x, kernel, stride, padding, groups), (x, kernel)


def _grouped_transpose(kernel: jax.Array, groups: int) -> jax.Array:
  """HWIO kernel of a grouped conv [kh, kw, Ci/G, Co] -> that of its transpose
  [kh, kw, Co/G, Ci] (spatially flipped), for the input gradient as a grouped conv."""
  kh, kw, cig, co = kernel.shape
  k = jnp.flip(kernel, (0, 1)).reshape(kh, kw, cig, groups, co // groups)
  return k.transpose(0, 1, 4, 3, 2).reshape(kh, kw, co // groups, groups * cig)


def _conv_bwd(stride, padding, groups, res, g):
  """Both gradients as canonical NHWC/HWIO ops that XLA:CPU runs fast everywhere.

  XLA's own backward convolutions (swapped dimension numbers) fall to a slow
  path inside while loops on CPU (jax-ml/jax#12868): measured 14x (input
  gradient) and 58x (filter gradient) slower in a fori_loop than outside,
  which would make a lax.scan over synthesis or KD steps 4-5x slower than the
  same steps unrolled. Here the input gradient is a forward convolution of g
  (dilated by the stride) with the flipped, transposed kernel, and the filter
  gradient is one of conv_taps' three (a forward conv over the batch, shifted g, or
  kh*kw window matmuls; below); all run at full speed in and out of loops.
  """
  x, kernel = res
  if groups > 1:
    return _grouped_conv_bwd(stride, padding, groups, x, kernel, g)
  kh, kw, ci, co = kernel.shape
  k_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)  # HWIO of the transpose
  pads = _input_grad_pads(x, kernel, g, stride, padding)
  with jax.named_scope('conv_input_grad'):  # the names let profiles tell the two apart
    dx = lax.conv_general_dilated(g, k_t, (1, 1), pads, lhs_dilation=(stride, stride),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  with jax.named_scope('conv_filter_grad'):
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # Stride 1: one canonical forward conv over the batch (_filter_grad_as_conv; x0.58-0.98
    # of the window matmuls' time on the student and generator layers measured, see
    # benchmarks/filter_grad_speed.py), except for a narrow output (the generator's last
    # conv, C_out < C_in / 4), where shifting g is cheapest; strided and 1x1: windows.
    if stride == 1 and co * 4 < ci:
      dk = _filter_grad_shift_g(xp, g, kh, kw)
    elif stride == 1 and kh * kw > 1:
      dk = _filter_grad_as_conv(xp, g)
    else:
      dk = _filter_grad_windows(xp, g, kh, kw, stride)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _grouped_conv_bwd(stride, padding, groups, x, kernel, g):
  """_conv_bwd for feature_group_count > 1 (depthwise and grouped convs), the same way:
  the input gradient is a grouped forward conv of g with the transposed kernel; the
  filter gradient is kh*kw shifted products summed per group (for a depthwise conv
  an elementwise product and a sum, no matmul at all)."""
  kh, kw, cig, co = kernel.shape
  ho, wo = g.shape[1], g.shape[2]
  cog = co // groups
  with jax.named_scope('conv_input_grad'):
    dx = lax.conv_general_dilated(g, _grouped_transpose(kernel, groups).astype(g.dtype), (1, 1),
                                  _input_grad_pads(x, kernel, g, stride, padding),
                                  lhs_dilation=(stride, stride),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)
  with jax.named_scope('conv_filter_grad'):
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    g3 = g.reshape(-1, groups, cog)
    taps = [jnp.einsum('mgi,mgo->igo', sl.reshape(-1, groups, cig), g3,
                       preferred_element_type=jnp.float32)
            for sl in _windows(xp, kh, kw, ho, wo, stride)]
    dk = jnp.stack(taps).reshape(kh, kw, cig, co)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_explicit_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
           impl: str = 'auto', groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution with symmetric explicit padding (PyTorch semantics).

  groups: PyTorch's `groups` (XLA's feature_group_count); kernel [kh, kw, C_in/groups,
  C_out]; groups == C_in is a depthwise conv.

  impl: 'xla' (XLA's own gradients), 'explicit_grad' (same forward; gradients
  as canonical forward convs and matmuls, see _conv_bwd; a depthwise conv is
  shifted multiply-adds, forward and gradients, conv_taps.depthwise_conv2d), or 'auto' =
  'explicit_grad' on the CPU backend (where XLA's backward convs are slow inside
  loops, and its filter gradient ~2x slower than matmuls for wide layers),
  'xla' on GPU/TPU.
  """
  if _resolve_impl(impl) == 'xla':
    return _xla_conv(x, kernel, stride, padding, groups)
  if is_depthwise(kernel, groups):  # XLA:CPU's depthwise conv is slow: see conv_taps
    return depthwise_conv2d(x, kernel, stride, padding)
  return _conv_explicit_grad(x, kernel, stride, padding, groups)


def _resolve_impl(impl: str) -> str:
  if impl == 'auto':
    return 'explicit_grad' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in ('xla', 'explicit_grad'):
    raise ValueError(f"conv impl must be 'auto', 'xla' or 'explicit_grad', got {impl!r}.")
  return impl


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of NHWC images (nn.Upsample(scale_factor=2))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _phase_kernels(kernel: jax.Array) -> jax.Array:
  """[3, 3, I, O] -> [2, 2, I, 4 O]: the 2x2 kernels of the four output phases of
  a 3x3 conv on a nearest-upsampled image, phases (a, b) in row-major order.

  Output row 2i + a of the upsampled conv reads upsampled rows 2i + a - 1 ..
  2i + a + 1, i.e. source rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for
  a = 1: taps that read the same source row add up.
  """
  def fold(k, axis):  # the 3 taps along `axis` -> 2 per phase: [phase, 2, ...]
    t = [lax.index_in_dim(k, i, axis, keepdims=False) for i in range(3)]
    return (jnp.stack([t[0], t[1] + t[2]], axis), jnp.stack([t[0] + t[1], t[2]], axis))
  blocks = [kc for kr in fold(kernel, 0) for kc in fold(kr, 1)]  # (0,0), (0,1), (1,0), (1,1)
  return jnp.concatenate(blocks, axis=-1)


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array, impl: str = 'auto') -> jax.Array:
  """conv2d(upsample2(x), kernel, stride 1, padding 1) for a 3x3 kernel.

  With the explicit-gradient convs (CPU), the upsampled image is never built:
  each of the four output phases is a 2x2 conv of x with summed taps, all four
  as one conv with 4x the output channels, then interleaved. 16 instead of 36
  multiply-adds per (input, output) channel pair and source pixel, forward and
  in both gradients; the same sums in another order (float32 rounding apart).
  On GPU/TPU ('xla') it is literally upsample then conv.
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'upsample2_conv3x3 needs a 3x3 kernel, got {kernel.shape[:2]}.')
  impl = _resolve_impl(impl)
  if impl == 'xla':
    return _xla_conv(upsample2(x), kernel, 1, 1)
  n, h, w, _ = x.shape
  co = kernel.shape[-1]
  o = conv2d(x, _phase_kernels(kernel), 1, 1, impl)  # [N, H+1, W+1, 4 O]
  o = o.reshape(n, h + 1, w + 1, 2, 2, co)
  rows = []
  for a in range(2):
    cols = [o[:, a:a + h, b:b + w, a, b] for b in range(2)]          # [N, H, W, O] each
    rows.append(jnp.stack(cols, axis=3).reshape(n, h, 2 * w, co))    # column 2j + b
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, co)       # row 2i + a


class Conv(nn.Module):
  """2D convolution, PyTorch padding semantics; params 'kernel' (HWIO), 'bias'."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = False
  dtype: Optional[Dtype] = None
  kernel_init: Initializer = he_fan_out_init
  bias_init: Initializer = nn.initializers.zeros
  impl: str = 'auto'  # see conv2d
  upsample: bool = False  # nearest x2 upsampling of the input first (3x3, stride 1, pad 1)
  groups: int = 1  # PyTorch `groups`; = input channels for a depthwise conv

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    if x.shape[-1] % self.groups or self.features % self.groups:
      raise ValueError(f'Conv groups={self.groups} must divide the input ({x.shape[-1]}) and '
                       f'output ({self.features}) channels.')
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    dtype = self.dtype or x.dtype
    if self.upsample:
      if (k, self.stride, self.padding, self.groups) != (3, 1, 1, 1):
        raise ValueError('Conv(upsample=True) is a 3x3 conv with stride 1 and padding 1, got '
                         f'kernel_size={k}, stride={self.stride}, padding={self.padding}.')
      y = upsample2_conv3x3(x.astype(dtype), kernel.astype(dtype), self.impl)
    else:
      y = conv2d(x.astype(dtype), kernel.astype(dtype), self.stride, self.padding, self.impl,
                 self.groups)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch semantics and input taps.

  Params 'scale', 'bias'; batch_stats 'mean', 'var' (same names as flax's
  BatchNorm, so checkpoints and optimizers treat them alike). Statistics are
  computed in float32 whatever the activation dtype. `axis_name` makes the
  batch statistics global under pmap (mesh-jit needs nothing: it sees the
  global batch).
  """
  momentum: float = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  axis_name: Optional[str] = None
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', self.bias_init, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)

    if self.is_mutable_collection(TAPS):
      self.sow(TAPS, 'bn', input_tap(xf, ra_mean.value, ra_var.value))

    if train and one_pass_bn():  # one read of x for both statistics (norm_ops)
      y, mean, var = batch_norm_train(xf, scale, bias, self.epsilon, self.axis_name)
    else:
      if train:
        mean = jnp.mean(xf, axis=(0, 1, 2))
        if self.axis_name is not None:
          mean = lax.pmean(mean, self.axis_name)
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
        if self.axis_name is not None:
          var = lax.pmean(var, self.axis_name)
      else:
        mean, var = ra_mean.value, ra_var.value
      mul = scale * lax.rsqrt(var + self.epsilon)
      y = xf * mul + (bias - mean * mul)
    if train and not self.is_initializing():
      n = x.shape[0] * x.shape[1] * x.shape[2]
      if self.axis_name is not None:
        n = n * lax.psum(1, self.axis_name)
      unbiased = var * n / max(n - 1, 1)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    return y.astype(self.dtype or x.dtype)


class BlockStack(nn.Module):
  """A PyTorch `nn.Sequential` of residual blocks: children '0', '1', ...; only
  the first strides. `block` is a module class called as
  block(features, stride, dtype, axis_name, name=...)(x, train); remat runs each
  block under nn.remat (same parameters and outputs, activations recomputed)."""
  block: Any
  num_blocks: int
  features: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    block = nn.remat(self.block, static_argnums=(2,)) if self.remat else self.block
    for i in range(self.num_blocks):
      x = block(self.features, self.stride if i == 0 else 1, self.dtype,
                self.axis_name, name=str(i))(x, train)
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C] (AdaptiveAvgPool2d(1) + flatten)."""
  return jnp.mean(x, axis=(1, 2))


def fixed_avg_pool(x: jax.Array, window: int, arch: str, input_hw, size: int = 32) -> jax.Array:
  """AvgPool2d(window) + flatten for nets whose head expects exactly one window.

  The reference nets that pool with a fixed window (RepDistiller's resnet8..110 and
  shufflenetv2) only work at the input size they were built for: elsewhere the
  head's input has the wrong width (a shape error in PyTorch). Here that is a
  clear error naming the size that works.
  """
  if x.shape[1:3] != (window, window):
    h, w = input_hw
    raise ValueError(f'{arch} works at {size}x{size} inputs only: its AvgPool2d({window}) head '
                     f'needs a {window}x{window} final feature map, but a {h}x{w} input gives '
                     f'{x.shape[1]}x{x.shape[2]}. Resize the images to {size}x{size}.')
  return global_avg_pool(x)
