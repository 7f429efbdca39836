"""The CPU speed rewrites compute the same values and gradients as the plain forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cmi_jax.synthesis import cmi, losses

D, B, N_NEG, HEAD_DIM, CR_T = 12, 4, 6, 5, 0.1


def _head_state(kind='mlp'):
  cfg = cmi.SynthesisConfig(image_shape=(8, 8, 1), num_classes=3, mean=(0.5,), std=(0.25,),
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
      got = jax.value_and_grad(split, argnums=(0, 1, 2))(state.params, feat_l, feat_g)
      want = jax.value_and_grad(whole, argnums=(0, 1, 2))(state.params, feat_l, feat_g)
      flat_got, flat_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
      assert len(flat_got) == len(flat_want)
      for a, b in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      # The global branch is stop-gradient: no gradient reaches the global features.
      assert not np.any(np.asarray(got[1][2]))
      assert float(got[0]) > 0
