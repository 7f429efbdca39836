"""The CMI generator and the larger GAN-baseline generator (reference layout).

`l1.0`: Linear(nz -> width * (S/4)^2), reshaped NCHW-style (so converted
PyTorch weights give the same images); `conv_blocks`: 0 BN, up x2, 2 conv,
3 BN, LeakyReLU(0.2), up x2, 6 conv, 7 BN, LeakyReLU(0.2), 9 conv (bias),
sigmoid. The CMI generator has width 2*ngf after `l1`; the large one (DAFL,
ZSKT, DFQ, DFAD) 4*ngf, halving at each conv. Output in [0, 1], NHWC.

Initializers are the reference's per-round reset: conv/linear weights
N(0, 0.02), biases 0, BN scale N(1, 0.02), BN bias 0.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import BatchNorm, Conv

_w_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _upsample2(x):
  """Nearest-neighbour x2 upsampling (nn.Upsample(scale_factor=2))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


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

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name,
                                scale_init=_bn_scale_init, name=name)
    conv = lambda f, name, bias=False: Conv(f, 3, 1, 1, use_bias=bias, dtype=self.dtype,
                                            kernel_init=_w_init, name=name)
    # CMI: 2ngf -> 2ngf -> ngf; large: 4ngf -> 2ngf -> ngf.
    w1 = self.width // 2 if self.large else self.width
    w2 = w1 // 2
    x = bn('0')(x, train)
    x = nn.leaky_relu(bn('3')(conv(w1, '2')(_upsample2(x)), train), 0.2)
    x = nn.leaky_relu(bn('7')(conv(w2, '6')(_upsample2(x)), train), 0.2)
    x = conv(self.nc, '9', bias=True)(x)
    return nn.sigmoid(x.astype(jnp.float32))
