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


def spatial_mean(x: jax.Array) -> jax.Array:
  """Per-sample mean over H, W in float32: [N, H, W, C] -> [N, C]."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _xla_conv(x, kernel, stride, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_explicit_grad(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _conv_bwd(stride, padding, res, g):
  """Both gradients as canonical NHWC/HWIO ops that XLA:CPU runs fast everywhere.

  XLA's own backward convolutions (swapped dimension numbers) fall to a slow
  path inside while loops on CPU (jax-ml/jax#12868): measured 14x (input
  gradient) and 58x (filter gradient) slower in a fori_loop than outside,
  which would make a lax.scan over synthesis or KD steps 4-5x slower than the
  same steps unrolled. Here the input gradient is a forward convolution of g
  (dilated by the stride) with the flipped, transposed kernel, and the filter
  gradient is kh*kw shifted matmuls; both run at full speed in and out of loops.
  """
  x, kernel = res
  kh, kw, ci, co = kernel.shape
  n, ho, wo, _ = g.shape
  h, w = x.shape[1], x.shape[2]
  k_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)  # HWIO of the transpose
  pads = []
  for size, k, o in ((h, kh, ho), (w, kw, wo)):
    lo = k - 1 - padding
    pads.append((lo, size + k - 1 - ((o - 1) * stride + 1) - lo))
  with jax.named_scope('conv_input_grad'):  # the names let profiles tell the two apart
    dx = lax.conv_general_dilated(g, k_t, (1, 1), pads, lhs_dilation=(stride, stride),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  with jax.named_scope('conv_filter_grad'):
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    g2 = g.reshape(-1, co)
    taps = []
    for i in range(kh):
      for j in range(kw):
        sl = lax.slice(xp, (0, i, j, 0),
                       (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, ci),
                       (1, stride, stride, 1))
        taps.append(jnp.dot(sl.reshape(-1, ci).T, g2, preferred_element_type=jnp.float32))
    dk = jnp.stack(taps).reshape(kh, kw, ci, co)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_explicit_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
           impl: str = 'auto') -> jax.Array:
  """NHWC x HWIO convolution with symmetric explicit padding (PyTorch semantics).

  impl: 'xla' (XLA's own gradients), 'explicit_grad' (same forward; gradients
  as canonical forward convs and matmuls, see _conv_bwd), or 'auto' =
  'explicit_grad' on the CPU backend (where XLA's backward convs are slow inside
  loops, and its filter gradient ~2x slower than matmuls for wide layers),
  'xla' on GPU/TPU.
  """
  if impl == 'auto':
    impl = 'explicit_grad' if jax.default_backend() == 'cpu' else 'xla'
  if impl == 'xla':
    return _xla_conv(x, kernel, stride, padding)
  if impl == 'explicit_grad':
    return _conv_explicit_grad(x, kernel, stride, padding)
  raise ValueError(f"conv impl must be 'auto', 'xla' or 'explicit_grad', got {impl!r}.")


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    dtype = self.dtype or x.dtype
    y = conv2d(x.astype(dtype), kernel.astype(dtype), self.stride, self.padding, self.impl)
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
      m = jnp.mean(xf, axis=(1, 2))                                   # [N, C]
      v = jnp.mean(jnp.square(xf - m[:, None, None, :]), axis=(1, 2))  # [N, C]
      self.sow(TAPS, 'bn', BNTap(m, v, ra_mean.value, ra_var.value))

    if train:
      mean = jnp.mean(xf, axis=(0, 1, 2))
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if self.axis_name is not None:
          n = n * lax.psum(1, self.axis_name)
        unbiased = var * n / max(n - 1, 1)
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value

    mul = scale * lax.rsqrt(var + self.epsilon)
    y = xf * mul + (bias - mean * mul)
    return y.astype(self.dtype or x.dtype)


class BlockStack(nn.Module):
  """A PyTorch `nn.Sequential` of residual blocks: children '0', '1', ...; only
  the first strides. `block` is a module class called as
  block(features, stride, dtype, axis_name, name=...)(x, train)."""
  block: Any
  num_blocks: int
  features: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_blocks):
      x = self.block(self.features, self.stride if i == 0 else 1, self.dtype,
                     self.axis_name, name=str(i))(x, train)
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C] (AdaptiveAvgPool2d(1) + flatten)."""
  return jnp.mean(x, axis=(1, 2))
