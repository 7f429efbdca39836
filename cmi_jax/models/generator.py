"""The CMI generator, the larger GAN-baseline generator, FastDFKD's ImageNet
DeepGenerator and NAYER's NLGenerator.

`l1.0`: Linear(nz -> width * (S/4)^2), reshaped NCHW-style (so converted
PyTorch weights give the same images); `conv_blocks`: 0 BN, up x2, 2 conv,
3 BN, LeakyReLU(0.2), up x2, 6 conv, 7 BN, LeakyReLU(0.2), 9 conv (bias),
sigmoid. The CMI generator has width 2*ngf after `l1`; the large one (DAFL,
ZSKT, DFQ, DFAD) 4*ngf, halving at each conv. Output in [0, 1], NHWC.

Initializers are the reference's per-round reset: conv/linear weights
N(0, 0.02), biases 0, BN scale N(1, 0.02), BN bias 0. NLGenerator (NAYER) is
built fresh by its reference (`NLGenerator.reinit`), so it takes PyTorch's
default init instead (`torch_init=True` of the shared conv trunk).

DeepGenerator (FastDFKD's ImageNet generator, zoo-and-datasets.md section 5) has
no Linear: a spatial latent [B, S/16, S/16, nz] goes straight into five conv
blocks, `block{i}` = the reference's `conv_blocks.{i}` conv (3x3, no bias) and
`conv_blocks.{i+1}` BN, then LeakyReLU(0.2): block0 2ngf @S/16, then after an
up x2 each block4 2ngf, block8 ngf, block12 ngf, block16 ngf (@S); `conv19`
3x3 to nc with bias; sigmoid. The reference's unused `l1` Linear is left out
(it never touches an image).
"""

from typing import Any, Optional

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import BatchNorm, Conv, torch_default_init

_w_init = nn.initializers.normal(0.02)


def _torch_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class _L1(nn.Module):
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, z):
    return nn.Dense(self.features, kernel_init=_w_init, dtype=self.dtype, name='0')(z)


class Generator(nn.Module):
  """x = G(z) in [0, 1]: [B, nz] -> [B, img_size, img_size, nc].

  large=False: CMI generator (2*ngf after l1); large=True: the GAN baselines'
  generator (4*ngf after l1, each conv halves the width).
  """
  nz: int = 256
  ngf: int = 64
  img_size: int = 32
  nc: int = 3
  large: bool = False
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, z, train: bool = True):
    if self.img_size % 4:
      raise ValueError(f'Generator img_size must be a multiple of 4, got {self.img_size}.')
    s = self.img_size // 4
    width = (4 if self.large else 2) * self.ngf
    h = _L1(width * s * s, self.dtype, name='l1')(z)
    # PyTorch views the Linear output as [B, C, S, S]; keep that element order.
    h = h.reshape(z.shape[0], width, s, s).transpose(0, 2, 3, 1)
    return _Blocks(width, self.nc, self.large, self.dtype, self.axis_name,
                   name='conv_blocks')(h, train)


class _Blocks(nn.Module):
  width: int
  nc: int
  large: bool
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  torch_init: bool = False  # PyTorch default init (NLGenerator) instead of N(0, 0.02)

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name,
                                scale_init=nn.initializers.ones if self.torch_init
                                else _bn_scale_init, name=name)

    def conv(f, name, bias=False, upsample=False):
      fan_in = 9 * x.shape[-1]  # read when the layer is built: x is then its input
      return Conv(f, 3, 1, 1, use_bias=bias, dtype=self.dtype, upsample=upsample,
                  kernel_init=torch_default_init if self.torch_init else _w_init,
                  bias_init=_torch_bias_init(fan_in) if self.torch_init
                  else nn.initializers.zeros, name=name)
    # CMI: 2ngf -> 2ngf -> ngf; large: 4ngf -> 2ngf -> ngf.
    w1 = self.width // 2 if self.large else self.width
    w2 = w1 // 2
    x = bn('0')(x, train)
    # upsample x2 then conv, fused (Conv(upsample=True): cheaper on CPU, same on GPU).
    x = nn.leaky_relu(bn('3')(conv(w1, '2', upsample=True)(x), train), 0.2)
    x = nn.leaky_relu(bn('7')(conv(w2, '6', upsample=True)(x), train), 0.2)
    x = conv(self.nc, '9', bias=True)(x)
    return nn.sigmoid(x.astype(jnp.float32))


class DeepGenerator(nn.Module):
  """x = G(z) in [0, 1]: [B, S/16, S/16, nz] -> [B, S, S, nc] (S = img_size).

  remat: each conv block under `nn.remat` (its activations recomputed in the
  backward pass instead of kept: less memory at 224 pixels, more compute).
  """
  nz: int = 256
  ngf: int = 64
  img_size: int = 224
  nc: int = 3
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, z, train: bool = True):
    s = self.img_size // 16
    if self.img_size % 16 or z.shape[1:] != (s, s, self.nz):
      raise ValueError(f'DeepGenerator(img_size={self.img_size}, nz={self.nz}) takes a latent '
                       f'[B, {s}, {s}, {self.nz}] (img_size a multiple of 16); got '
                       f'{tuple(z.shape)}.')
    block = nn.remat(_DeepBlock, static_argnums=(2,)) if self.remat else _DeepBlock
    x = z.astype(self.dtype or jnp.float32)
    widths = (2 * self.ngf, 2 * self.ngf, self.ngf, self.ngf, self.ngf)
    for i, w in enumerate(widths):
      x = block(w, i > 0, self.dtype, self.axis_name, name=f'block{4 * i}')(x, train)
    x = Conv(self.nc, 3, 1, 1, use_bias=True, dtype=self.dtype, kernel_init=_w_init,
             name='conv19')(x)
    return nn.sigmoid(x.astype(jnp.float32))


class _DeepBlock(nn.Module):
  """[up x2 ->] conv3x3 (no bias) -> BN -> LeakyReLU(0.2)."""
  features: int
  upsample: bool
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, 3, 1, 1, use_bias=False, dtype=self.dtype, upsample=self.upsample,
             kernel_init=_w_init, name='conv')(x)
    x = BatchNorm(dtype=self.dtype, axis_name=self.axis_name, scale_init=_bn_scale_init,
                  name='bn')(x, train)
    return nn.leaky_relu(x, 0.2)


class NLGenerator(nn.Module):
  """NAYER's generator (`datafree/models/generator.py` NLGenerator): x = G(LTE[y]).

  [B, E] label embeddings -> BatchNorm1d (affine, batch statistics) -> noisy
  layers: the batch is cut into consecutive chunks of `chunk` (= C, the number
  of classes) samples and chunk i goes through its own Linear(E -> le_emb_size),
  ceil(B / chunk) of them (the last chunk may be short) -> Linear(le_emb_size ->
  2*ngf*(S/4)^2), no activation between -> the CMI conv trunk -> sigmoid.

  The noisy layers are params 'le1' {'kernel': [nle, E, L], 'bias': [nle, L]}
  initialised W ~ N(0, 1), b = 0 (the reference's `re_init_le`, redone every
  loop with `reinit_noisy`); everything else takes PyTorch's default init.
  """
  batch_size: int             # B (the reference's sbz): fixes the number of noisy layers
  chunk: int                  # samples per noisy layer (the reference's nl = num_classes)
  le_emb_size: int = 1000
  ngf: int = 64
  img_size: int = 32
  nc: int = 3
  dtype: Optional[Any] = None

  @property
  def num_noisy(self) -> int:
    return -(-self.batch_size // self.chunk)

  @nn.compact
  def __call__(self, emb, train: bool = True):
    if self.img_size % 4:
      raise ValueError(f'NLGenerator img_size must be a multiple of 4, got {self.img_size}.')
    b = emb.shape[0]
    if b != self.batch_size:
      raise ValueError(f'NLGenerator was built for batch_size={self.batch_size} (its number of '
                       f'noisy layers depends on it); got a batch of {b}.')
    # BatchNorm1d over the batch: the shared BN layer on a [B, 1, 1, E] view.
    h = BatchNorm(axis_name=None, name='n1')(emb.astype(jnp.float32)[:, None, None, :], train)
    h = h[:, 0, 0, :]
    l = self.le_emb_size
    h = NoisyLayers(self.num_noisy, self.chunk, l, name='le1')(h)
    s = self.img_size // 4
    width = 2 * self.ngf
    h = nn.Dense(width * s * s, kernel_init=torch_default_init, bias_init=_torch_bias_init(l),
                 dtype=self.dtype, name='l1')(h)
    # PyTorch views the Linear output as [B, C, S, S]; keep that element order.
    h = h.reshape(b, width, s, s).transpose(0, 2, 3, 1)
    return _Blocks(width, self.nc, False, self.dtype, None, torch_init=True,
                   name='conv_blocks')(h, train)


class NoisyLayers(nn.Module):
  """`num` Linear(E -> features) layers, layer i applied to rows [i*chunk, (i+1)*chunk)."""
  num: int
  chunk: int
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(1.0),
                        (self.num, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.num, self.features), jnp.float32)
    return chunked_linear(x, kernel, bias, self.chunk)


def chunked_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array, chunk: int) -> jax.Array:
  """Row i of x [B, E] through Linear number i // chunk: kernel [n, E, L], bias [n, L].

  One batched matmul over the zero-padded [n, chunk, E] view (the padded rows
  are dropped), the same math whatever the batch's sharding.
  """
  b = x.shape[0]
  n = kernel.shape[0]
  if n * chunk < b or (n - 1) * chunk >= b:
    raise ValueError(f'{n} noisy layers of {chunk} samples do not cover a batch of {b} '
                     f'(need ceil({b}/{chunk}) = {-(-b // chunk)}).')
  xp = jnp.pad(x, ((0, n * chunk - b), (0, 0))).reshape(n, chunk, x.shape[1])
  y = jnp.einsum('nce,nel->ncl', xp, kernel.astype(x.dtype)) + bias[:, None, :].astype(x.dtype)
  return y.reshape(n * chunk, -1)[:b]


def reinit_noisy(params, rng: jax.Array):
  """NLGenerator params with fresh noisy layers: W ~ N(0, 1), b = 0 (`re_init_le`)."""
  out = dict(params)
  out['le1'] = {'kernel': jax.random.normal(rng, params['le1']['kernel'].shape, jnp.float32),
                'bias': jnp.zeros_like(params['le1']['bias'])}
  return out
