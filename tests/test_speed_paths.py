"""The CPU speed rewrites compute the same values and gradients as the plain forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cmi_jax.synthesis import cmi, losses
from cmi_jax.synthesis.config import SynthesisConfig

D, B, N_NEG, HEAD_DIM, CR_T = 12, 4, 6, 5, 0.1


def _head_state(kind='mlp'):
  cfg = SynthesisConfig(image_shape=(8, 8, 1), num_classes=3, mean=(0.5,), std=(0.25,),
                            head_kind=kind, head_dim=HEAD_DIM, cr_temperature=CR_T)
  head = cfg.make_head()
  params = head.init(jax.random.key(0), jnp.zeros((1, D)))['params'] if kind != 'none' else {}
  return cfg, train_state.TrainState.create(apply_fn=head.apply, params=params,
                                            tx=optax.adam(1e-3))


def _one_call(cfg, state, params, feat_l, feat_g, bank, valid):
  """The reference's form: one head call on [local, bank_local, global, bank_global]."""
  if bank is None:
    feats = jnp.concatenate([feat_l, feat_g])
  else:
    bank_l, bank_g = jnp.split(bank, 2, axis=1)
    feats = jnp.concatenate([feat_l, bank_l, feat_g, bank_g])
  p_l, p_g = jnp.split(state.apply_fn({'params': params}, feats), 2)
  return losses.contrastive_loss(p_l, p_g, feat_l.shape[0], valid, cfg.cr_temperature)


def test_split_head_calls_match_one_call():
  rng = np.random.default_rng(0)
  feat_l, feat_g = (jnp.asarray(rng.normal(size=(B, D)), jnp.float32) for _ in range(2))
  bank = jnp.asarray(rng.normal(size=(N_NEG, 2 * D)), jnp.float32)
  valid = jnp.asarray([True, True, False, True, True, False])
  for kind in ('mlp', 'linear', 'none'):
    cfg, state = _head_state(kind)
    for bank_feats, bank_valid in ((bank, valid), (None, None)):
      def split(params, fl, fg, bf=bank_feats, bv=bank_valid):
        return cmi._contrastive(cfg, state, params, fl, fg, bf, bv)  # pylint: disable=protected-access

      def whole(params, fl, fg, bf=bank_feats, bv=bank_valid):
        return _one_call(cfg, state, params, fl, fg, bf, bv)
      # jitted: one compile per form instead of one per primitive (eager dispatch).
      got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(state.params, feat_l, feat_g)
      want = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2)))(state.params, feat_l, feat_g)
      flat_got, flat_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
      assert len(flat_got) == len(flat_want)
      for a, b in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      # The global branch is stop-gradient: no gradient reaches the global features.
      assert not np.any(np.asarray(got[1][2]))
      assert float(got[0]) > 0


def _np_upsample_conv(x, k):
  """numpy: nearest x2 upsampling, then a 3x3 'same' cross-correlation (pad 1)."""
  u = x.repeat(2, axis=1).repeat(2, axis=2)
  n, h, w, _ = u.shape
  up = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum('nhwc,co->nhwo', up[:, i:i + h, j:j + w], k[i, j])
  return out


def test_upsample_conv_phases_match_numpy_and_xla():
  from cmi_jax.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  for shape, co in (((2, 4, 4, 3), 5), ((1, 3, 5, 2), 4)):
    x = rng.normal(size=shape).astype(np.float32)
    k = rng.normal(size=(3, 3, shape[-1], co)).astype(np.float32)
    want = _np_upsample_conv(x.astype(np.float64), k.astype(np.float64))
    for impl in ('explicit_grad', 'xla'):
      got = jax.jit(lambda a, b, i=impl: layers.upsample2_conv3x3(a, b, i))(x, k)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grads = [jax.jit(jax.grad(lambda a, b, i=impl: jnp.sum(layers.upsample2_conv3x3(a, b, i) * ct),
                              argnums=(0, 1)))(x, k)
             for impl in ('explicit_grad', 'xla')]
    for a, b in zip(*grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_conv_module_upsample_flag():
  from cmi_jax.models import layers  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
  conv = layers.Conv(6, upsample=True, use_bias=True, bias_init=jax.nn.initializers.ones)
  params = conv.init(jax.random.key(4), x)
  assert params['params']['kernel'].shape == (3, 3, 3, 6)  # the same parameters as before
  want = layers.conv2d(layers.upsample2(x), params['params']['kernel'], 1, 1, 'xla') + 1.0
  np.testing.assert_allclose(np.asarray(conv.apply(params, x)), np.asarray(want), atol=1e-5)
  bad = layers.Conv(6, stride=2, upsample=True)
  try:
    bad.init(jax.random.key(4), x)
  except ValueError as e:
    assert 'stride=2' in str(e)
  else:
    raise AssertionError('Conv(upsample=True, stride=2) must be refused')


def test_filter_grad_of_narrow_output_matches_xla(monkeypatch):
  """Stride-1 filter gradients: a narrow output (C_out < C_in / 4) shifts g; other kxk
  kernels are one forward conv over the batch (_filter_grad_as_conv, with the equal and
  the wider-output widths); 1x1 kernels one matmul; all equal XLA's own gradients."""
  from cmi_jax.models import layers  # pylint: disable=import-outside-toplevel
  taken = []
  for path in ('_filter_grad_shift_g', '_filter_grad_as_conv'):
    def spy(*args, _f=getattr(layers, path), _p=path):
      taken.append(_p)
      return _f(*args)
    monkeypatch.setattr(layers, path, spy)
  rng = np.random.default_rng(5)
  cases = ((3, 9, 2, 5, '_filter_grad_shift_g'), (3, 16, 3, 6, '_filter_grad_shift_g'),
           (3, 6, 2, 5, '_filter_grad_as_conv'), (2, 5, 3, 4, '_filter_grad_as_conv'),
           (1, 4, 1, 3, None), (3, 4, 4, 6, '_filter_grad_as_conv'),
           (3, 3, 16, 7, '_filter_grad_as_conv'))
  for ksize, ci, co, size, path in cases:
    taken.clear()
    x = jnp.asarray(rng.normal(size=(2, size, size, ci)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(ksize, ksize, ci, co)), jnp.float32)
    pad = 1 if ksize > 1 else 0
    g = jnp.asarray(rng.normal(size=layers.conv2d(x, k, 1, pad, 'xla').shape), jnp.float32)
    got, want = (jax.jit(jax.grad(lambda x_, k_, i=impl: jnp.sum(layers.conv2d(x_, k_, 1, pad, i) * g),
                                  argnums=(0, 1)))(x, k) for impl in ('explicit_grad', 'xla'))
    assert taken == ([path] if path else []), (ksize, ci, co, taken)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
