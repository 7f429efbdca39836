"""The benchmark scripts' own small pieces (the runs themselves live in benchmarks/)."""

import json
import pytest

from benchmarks.common import write_result
from benchmarks.fmnist_methods import _mean_std, parse_spec


def test_parse_spec():
  assert parse_spec('cmi', [0, 1]) == ('cmi', None, [0, 1])
  assert parse_spec('deepinv@40', [3]) == ('deepinv', 40, [3])
  assert parse_spec('dfq:0', [0, 1, 2]) == ('dfq', None, [0])
  assert parse_spec('deepinv@40:1+2', [0]) == ('deepinv', 40, [1, 2])


def test_mean_std_over_seeds():
  assert _mean_std([70.0, 72.0, 77.0]) == (73.0, 3.61)  # sample std sqrt(13)
  assert _mean_std([68.58]) == (68.58, None)


def test_write_result_creates_folder(tmp_path):
  path = tmp_path / 'results' / 'x.json'
  write_result(str(path), {'rows': [1, 2]})
  assert json.loads(path.read_text()) == {'rows': [1, 2]}


@pytest.mark.slow
def test_synthesis_speed_quick(tmp_path, compilation_cache):
  """The side-by-side speed benchmark's quick path: cmi_jax rounds and KD scans
  timed and profiled per op family (the PyTorch side only where torch exists)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from benchmarks import synthesis_speed  # pylint: disable=import-outside-toplevel
  has_torch = importlib.util.find_spec('torch') is not None
  try:  # jax 0.10 has no ProfileSession: rows come without 'profile' (a warning)
    from jax.profiler import ProfileSession  # pylint: disable=import-outside-toplevel,unused-import
    has_profiler = True
  except ImportError:
    has_profiler = False
  out = tmp_path / 'speed.json'
  argv = ['--quick', '--out', str(out)] + ([] if has_torch else ['--no_torch'])
  result = synthesis_speed.main(argv)
  assert json.loads(out.read_text()) == result
  rows = {r['setting']: r for r in result['rows']}
  assert set(rows) == set(synthesis_speed.QUICK)
  for row in rows.values():
    assert row['jax_s'] > 0 and all(t > 0 for t in row['jax_round_s']['2'])
    assert ('ratio_jax_to_torch' in row) == has_torch
    assert ('profile' in row) == has_profiler
    if not has_profiler:
      continue
    prof = row['profile']
    assert abs(sum(prof['fraction'].values()) - 1.0) < 1e-6
    # Both workloads run convolutions forward and backward, and the rest.
    assert prof['seconds']['conv_fwd'] > 0 and prof['seconds']['conv_input_grad'] > 0
    assert prof['seconds']['elementwise_other'] > 0
  if has_profiler:  # the synthesis round also differentiates the generator's filters
    assert rows['quick_16x16x3_b8']['profile']['seconds']['conv_filter_grad'] > 0


def test_profile_conv_families():
  """HLO convolutions are told apart by cmi_jax's name scopes or XLA's layouts."""
  from benchmarks.synthesis_speed import _conv_family, _dot_family  # pylint: disable=import-outside-toplevel
  fwd = 'dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/jvp(WideResNet)/conv1/conv"}'
  dx = 'dim_labels=b01f_01oi->b01f, metadata={op_name="jit(f)/transpose(jvp(WideResNet))/c"}'
  dk = 'dim_labels=f01b_i01o->01bf, metadata={op_name="jit(f)/transpose(jvp(WideResNet))/c"}'
  ours = 'dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/transpose(jvp(G))/conv_input_grad/c"}'
  assert [_conv_family(r) for r in (fwd, dx, dk, ours)] == [
      'conv_fwd', 'conv_input_grad', 'conv_filter_grad', 'conv_input_grad']
  assert _dot_family('metadata={op_name="a/conv_filter_grad/dot_general"}') == 'conv_filter_grad'
  assert _dot_family('metadata={op_name="a/Head/head/0/dot_general"}') == 'matmul'


def test_time_to_accuracy_table(tmp_path):
  """The README table from a results dict: means with min-max over seeds, the seeds
  that reached a target counted, pool sizes read from each run's last metrics row."""
  from benchmarks import time_to_accuracy as tta  # pylint: disable=import-outside-toplevel

  def run(seed, accs, secs):
    curve = [{'accuracy': a, 'train_s': t, 'flops': 2e12 * (i + 1)}
             for i, (a, t) in enumerate(zip(accs, secs))]
    return {'method': 'fast5', 'seed': seed, 'curve': curve}

  runs = [run(0, [70.0, 85.0, 86.0], [10.0, 20.0, 30.0]),
          run(1, [60.0, 81.0, 83.0], [12.0, 24.0, 36.0])]
  for seed, size in ((0, 128), (1, 192)):
    d = tmp_path / f'fast5_s{seed}'
    d.mkdir()
    (d / 'metrics.jsonl').write_text(
        json.dumps({'round': 1, 'pool_size': 64}) + '\n' +
        json.dumps({'round': 2, 'pool_size': size}) + '\n')
  table = tta.markdown_table({'summary': tta.summarize(runs), 'runs': runs}, str(tmp_path))
  row = table.splitlines()[2].split(' | ')
  assert row[0] == '| FastDFKD Fast-5 (`fast5`)' and row[1] == '0, 1'
  assert row[2] == '22 s (20 s-24 s)'            # time to 80 %: both seeds
  assert row[3] == '20 s (1 of 2 seeds)'          # time to 84.4 %: seed 0 only
  assert row[4] == '84.50 (83.00-86.00)'          # final
  assert row[5] == '84.50 (83.00-86.00)'          # best
  assert row[6] == '33 (30-36)' and row[7] == '6.0'
  assert row[8] == '160 (128-192) |'


@pytest.mark.slow
def test_pool_memory_quick(tmp_path):
  """The pool benchmark's quick path on the session's 4 fake devices: the sharded pool
  costs each device 1/4 of the device pool's bytes per image (the images' own bytes)."""
  from benchmarks import pool_memory  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'pool.json'
  result = pool_memory.main(['--quick', '--out', str(out)])
  assert json.loads(out.read_text())['kd_speed'] == result['kd_speed']
  rows = {(r['shape'], r['mode']): r for r in result['memory']}
  assert rows[('224x224x3', 'device')]['kd_chunk_bytes_per_image_per_device'] == 224 * 224 * 3
  assert rows[('224x224x3', 'sharded')]['kd_chunk_bytes_per_image_per_device'] == 224 * 224 * 3 / 4
  assert result['kd_speed']['ratio_sharded_to_device'] > 0
  assert result['checkpoint']['ratio_incremental_to_full'] > 0


# ----------------------------------------------------------------------------
# The torch FastDFKD ImageNet baseline (benchmarks/torch_fast.py) against cmi_jax
# ----------------------------------------------------------------------------

def _tiny_fast_cfg(**kw):
  """fast_imagenet at a testing-only size: 32x32 (a 2x2 latent), nz 8, ngf 4, batch 4."""
  from cmi_jax.synthesis.api import make_config  # pylint: disable=import-outside-toplevel
  values = dict(image_shape=(32, 32, 3), num_classes=10, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), method='fast_imagenet', batch_size=4, g_steps=2,
                nz=8, ngf=4, pool_size=8)
  return make_config(**{**values, **kw})


def _twin(arch, variables):
  """The torch twin of a zoo net carrying cmi_jax's variables (strict load)."""
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_baseline as tb  # pylint: disable=import-outside-toplevel
  from cmi_jax import convert  # pylint: disable=import-outside-toplevel
  net = tb.build_classifier(arch, 10, 3)
  sd = {k: torch.from_numpy(v.copy()) for k, v in convert.flax_to_torch(variables).items()}
  net.load_state_dict(sd, strict=False)  # only num_batches_tracked may be missing
  assert all(k.endswith('num_batches_tracked') for k in set(net.state_dict()) - set(sd))
  return net


def test_torch_deep_generator_matches_flax():
  """The authors' DeepGenerator with cmi_jax's weights loaded gives cmi_jax's images."""
  torch = pytest.importorskip('torch')
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_fast  # pylint: disable=import-outside-toplevel
  from cmi_jax.models.generator import DeepGenerator  # pylint: disable=import-outside-toplevel
  gen = DeepGenerator(nz=8, ngf=4, img_size=32)
  z = jax.random.normal(jax.random.key(1), (3, 2, 2, 8))
  variables = gen.init(jax.random.key(0), z)
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  x, _ = gen.apply(variables, z, train=True, mutable=['batch_stats'])
  tgen = torch_fast.load_flax_generator(torch_fast.DeepGenerator(8, 4, 32), variables).train()
  assert tgen.state_dict()['conv_blocks.0.weight'].shape == (8, 8, 3, 3)
  assert tgen.state_dict()['conv_blocks.19.bias'].shape == (3,)
  with torch.no_grad():
    tx = tgen(torch.from_numpy(np.array(z)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(tx, np.asarray(x), atol=1e-5, rtol=0)
  assert np.std(tx) > 1e-3  # images that depend on z, not a constant


def _fast_parity(variants=('exact',)):
  """Two rounds of cmi_jax's fast_round and of FastImageNetSynthesizer from the same
  meta-generator, latent, nets, targets and augmentation (cmi_jax's warps replayed in
  torch). The student is the teacher with its logits scaled by 1.5 (same argmax: the
  L_adv mask is on, its KL non-zero). variants: 'exact', or 'wrong_weight' (one torch
  generator conv 10 % off). Returns {variant: per round (jax rows, torch rows, jax
  images, torch images, jax z, torch z)}, NHWC numpy."""
  import torch  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_fast  # pylint: disable=import-outside-toplevel
  from cmi_jax import augment, models  # pylint: disable=import-outside-toplevel
  from cmi_jax.synthesis import fast  # pylint: disable=import-outside-toplevel
  from cmi_jax.teacher import Teacher  # pylint: disable=import-outside-toplevel
  cfg = _tiny_fast_cfg()
  key = jax.random.key(0)
  mod = models.get('wrn_16_1', 10)
  # Jitted set-up: eager op-by-op dispatch compiles hundreds of tiny programs.
  t_vars = jax.jit(lambda k: models.init(mod, k, (1, 32, 32, 3)))(jax.random.fold_in(key, 10))
  s_vars = {**t_vars, 'params': {**t_vars['params'], 'fc': jax.tree.map(
      lambda a: 1.5 * a, t_vars['params']['fc'])}}
  teacher, student = Teacher(mod, t_vars), Teacher(mod, s_vars)
  state = jax.jit(fast.init_state, static_argnums=(0,))(cfg, teacher, key)
  gen_vars = {'params': state.gen.params, 'batch_stats': state.gen.batch_stats}
  z0 = np.asarray(state.z)
  round_fn = jax.jit(fast.fast_round, static_argnums=(0,))

  @jax.jit
  def round_inputs(r):
    """Round r's key, targets and the warps fast_round draws (views' first key)."""
    rng = jax.random.fold_in(key, 100 + r)
    targets = jax.random.randint(jax.random.fold_in(key, 200 + r), (cfg.batch_size,), 0, 10)
    step_keys = jax.random.split(fast.round_keys(rng)['steps'], cfg.g_steps)
    warps = [augment.resized_crop_flip(jax.random.split(step_keys[i])[0], cfg.batch_size,
                                       (32, 32), cfg.local_scale) for i in range(cfg.g_steps)]
    return rng, targets, warps

  rounds = []
  for r in range(2):
    rng, targets, warps = round_inputs(r)
    state, res = round_fn(cfg, teacher, student, state, rng, targets)
    rows = {k: np.asarray(res.metrics[k]) for k in ('loss', 'l_bn', 'l_oh', 'l_adv')}
    rounds.append((np.asarray(targets), warps, rows, np.asarray(res.images),
                   np.asarray(state.z)))
  out = {}
  for variant in variants:
    syn = torch_fast.FastImageNetSynthesizer(_twin('wrn_16_1', t_vars), _twin('wrn_16_1', s_vars),
                                             cfg)
    torch_fast.load_flax_generator(syn.generator, gen_vars)
    syn.z = torch.from_numpy(z0.copy()).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    if variant == 'wrong_weight':  # the last BN's scale (a conv's would cancel in its BN)
      with torch.no_grad():
        syn.generator.conv_blocks[17].weight.mul_(1.1)
    out[variant] = []
    for targets, warps, rows, jx, jz in rounds:
      def replay(x, step, warps=warps):  # cmi_jax's apply_warp, NCHW, two matmuls
        rows, cols = (torch.from_numpy(np.array(m)) for m in warps[step])
        return torch.einsum('bih,bchj->bcij', rows, torch.einsum('bchw,bjw->bchj', x, cols))
      syn.augment = replay
      images = syn.run_round(targets=torch.from_numpy(targets.copy()).long())
      t_rows = {k: np.array([float(row[k]) for row in syn.rows]) for k in rows}
      out[variant].append((rows, t_rows, jx, images.permute(0, 2, 3, 1).numpy().copy(), jz,
                           syn.z.detach().permute(0, 2, 3, 1).numpy().copy()))
  return out


# Measured exact-variant maxima (float32, this CPU): terms 1.6e-6, images 2.0e-6, z 8.3e-6;
# z 3.0e-4 with jax_disable_most_optimizations (the test session's setting). z is checked
# loosely (a tenth of one round's largest move 2 lr_z): 
# Adam's g / (sqrt(v) + eps) magnifies the rounding of near-zero latent gradients; a wrong
# z would show in the later steps' terms and images, which are checked tightly.
# the wrong_weight variant: 2e-2, 7e-2, 6e-2.
FAST_PARITY = {'terms': 2e-5, 'images': 2e-5, 'z': 2e-3}


def _fast_mismatch(result):
  """Largest differences over both rounds: loss terms |t - j| / max(|j|, 0.1) (the
  small L_adv, ~0.02, measured absolutely below 0.1), images and latent absolute."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  worst = {'terms': 0.0, 'images': 0.0, 'z': 0.0}
  for rows, t_rows, jx, tx, jz, tz in result:
    for k in rows:
      d = np.abs(t_rows[k] - rows[k]) / np.maximum(np.abs(rows[k]), 0.1)
      worst['terms'] = max(worst['terms'], float(np.max(d)))
    worst['images'] = max(worst['images'], float(np.max(np.abs(tx - jx))))
    worst['z'] = max(worst['z'], float(np.max(np.abs(tz - jz))))
  return worst


def test_torch_fast_round_matches_cmi_jax():
  """Two Fast-2 rounds on both sides give the same per-step L_bn, L_oh, L_adv and
  total, the same last-iterate images and the same latent afterwards. Round 1 checks
  the generator, augmentation, loss terms and the inner Adam; round 2 the momentum
  L_bn (EMA of round 1) and the Reptile meta-Adam step on theta. A 10 % change of one
  generator weight on the torch side must fail the same check.
  """
  pytest.importorskip('torch')
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = _fast_parity(('exact', 'wrong_weight'))
  for rows, *_ in out['exact']:
    assert np.all(rows['l_adv'] < 0) and np.all(rows['l_bn'] > 0)  # every term is live
  exact, wrong = _fast_mismatch(out['exact']), _fast_mismatch(out['wrong_weight'])
  assert all(exact[k] < tol for k, tol in FAST_PARITY.items()), exact
  assert all(wrong[k] > tol for k, tol in FAST_PARITY.items()), wrong


def _crop_boxes(view, size, margin=1):
  """Each sample's crop box from a view of coordinate ramps (channel 0 = column, 1 =
  row index): a crop-and-resize maps output pixel j to input left + w (j + 0.5) / S
  - 0.5, a linear function, so the interior's slope gives w (its sign the flip) and
  the offset gives left; `margin` pixels at each end (which may read the zero padding)
  are left out. Returns [N, 4] (left, top, width, height) in pixels."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = []
  for v in view:
    col, row = v[0, size // 2, margin:-margin], v[1, margin:-margin, size // 2]
    boxes = []
    for ramp, flip_ok in ((col, True), (row, False)):
      slope = (ramp[-1] - ramp[0]) / (len(ramp) - 1)
      if not flip_ok:
        assert slope > 0  # rows are never flipped
      length = abs(slope) * size
      first = ramp[0] if slope > 0 else ramp[-1]  # output pixel margin (S-1-margin flipped)
      boxes.append((first - length * (margin + 0.5) / size + 0.5, length))
    (left, w), (top, h) = boxes
    out.append((left, top, w, h))
  return np.array(out)


def test_kd_trainer_crop_scale():
  """KDTrainer(crop_scale=(lo, hi)) crops whole-pixel boxes inside the image with area
  fraction in [lo, hi] and aspect ratio in [3/4, 4/3] (up to the sides' rounding),
  flips about half, and spreads over the range; the default keeps the padded crop
  (unit scale, offsets within the padding)."""
  torch = pytest.importorskip('torch')
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_baseline as tb  # pylint: disable=import-outside-toplevel
  s, n = 64, 256
  ramp = torch.arange(s, dtype=torch.uint8)
  pool = torch.stack([ramp.view(1, s).expand(s, s), ramp.view(s, 1).expand(s, s),
                      torch.zeros((s, s), dtype=torch.uint8)]).expand(n, 3, s, s)
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * s * s, 2))
  unscaled = ((0.0,) * 3, (1 / 255,) * 3)  # x = pixel value: the ramps are coordinates
  torch.manual_seed(0)
  trainer = tb.KDTrainer(net, net, pool, *unscaled, batch_size=n, crop_scale=(0.5, 0.9))
  view = trainer.view(pool).numpy()
  boxes = _crop_boxes(view, s)
  left, top, w, h = boxes.T
  np.testing.assert_allclose(boxes, np.round(boxes), atol=1e-3)  # whole pixels
  assert np.all(left >= -1e-3) and np.all(top >= -1e-3)
  assert np.all(left + w <= s + 1e-3) and np.all(top + h <= s + 1e-3)
  area = w * h / s ** 2
  # Sides rounded to whole pixels: sqrt(A r) +- 0.5 each, so the area moves by < 2 %.
  assert area.min() >= 0.5 * 0.98 and area.max() <= 0.9 * 1.02, (area.min(), area.max())
  assert area.min() < 0.55 and area.max() > 0.85  # the draws span the range
  ratio = w / h
  assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03
  flipped = np.mean(view[:, 0, s // 2, 2] < view[:, 0, s // 2, 1])
  assert 0.35 < flipped < 0.65
  default = tb.KDTrainer(net, net, pool, *unscaled, batch_size=n).view(pool).numpy()
  cols = default[:, 0, s // 2, 8:-8]  # inside every padded crop: a unit-slope ramp
  np.testing.assert_allclose(np.abs(np.diff(cols, axis=1)), 1.0, atol=1e-4)
  offsets = _crop_boxes(default, s, margin=8)
  assert np.all(np.abs(offsets[:, 2:] - s) < 1e-3)  # no resizing
  assert np.all(np.abs(offsets[:, :2]) <= 4 + 1e-3) and offsets[:, :2].std() > 1  # padding 4


@pytest.mark.slow
def test_synthesis_speed_imagenet_quick(tmp_path, compilation_cache):
  """--rows=imagenet at a testing-only size: both rows timed on both sides (torch where
  installed), named after the recipe, carrying the config's values in 'recipe'."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from benchmarks import synthesis_speed  # pylint: disable=import-outside-toplevel
  from configs import imagenet as imagenet_config  # pylint: disable=import-outside-toplevel
  has_torch = importlib.util.find_spec('torch') is not None
  try:  # jax 0.10 has no ProfileSession: rows come without 'profile' (a warning)
    from jax.profiler import ProfileSession  # pylint: disable=import-outside-toplevel,unused-import
    has_profiler = True
  except ImportError:
    has_profiler = False
  out = tmp_path / 'speed.json'
  tiny = ('image_size=32,teacher=wrn_16_1,student=wrn_16_1,nz=16,ngf=8,num_classes=10,'
          'batch=2,pool=8')
  argv = ['--rows=imagenet', '--quick', '--no_profile', f'--imagenet_override={tiny}',
          '--out', str(out)] + ([] if has_torch else ['--no_torch'])
  result = synthesis_speed.main(argv)
  assert json.loads(out.read_text()) == result
  rows = {r['setting']: r for r in result['rows']}
  assert set(rows) == {'imagenet_fast50_wrn_16_1_wrn_16_1_32_b2',
                       'imagenet_kd_wrn_16_1_wrn_16_1_32_b2'}
  c = imagenet_config.get_config(synthesis_speed.IMAGENET_ROW)
  for name, row in rows.items():
    assert row['kind'] == ('kd_step' if '_kd_' in name else 'synthesis_iteration')
    assert row['jax_s'] > 0 and row['batch_size'] == 2 and row['image_shape'] == [32, 32, 3]
    assert ('ratio_jax_to_torch' in row) == has_torch and 'profile' not in row
    if has_torch:
      assert row['torch_s'] > 0 and len(row['torch_round_s']['2']) == 1
    r = row['recipe']
    assert r['config'] == 'configs/imagenet.py:resnet50-resnet50' and r['method'] == 'fast_imagenet'
    assert r['synthesis']['g_steps_config'] == c.synthesis.g_steps == 50
    assert r['synthesis']['weights'] == {'bn': 0.1, 'oh': 0.1, 'adv': 0.1}
    assert r['synthesis']['local_scale'] == [0.75, 1.0] and r['synthesis']['meta_rule'] == 'reptile'
    assert r['kd']['temperature'] == c.kd.temperature == 5.0
    assert r['kd']['crop_scale'] == [0.08, 1.0] and r['kd']['pool_images'] == 8
    assert r['overrides']['teacher'] == 'wrn_16_1'


def test_synthesis_speed_imagenet_recipe():
  """The default ImageNet rows: configs/imagenet.py's resnet50-resnet50 values at batch 4."""
  from benchmarks import synthesis_speed as ss  # pylint: disable=import-outside-toplevel
  r = ss.imagenet_recipe()
  assert set(ss.imagenet_rows(r)) == {'imagenet_fast50_resnet50_resnet50_224_b4',
                                      'imagenet_kd_resnet50_resnet50_224_b4'}
  s = r.synthesis
  assert (s.algorithm, s.generator, s.views, s.image_shape) == ('fast', 'deep', 'resized',
                                                               (224, 224, 3))
  assert (s.batch_size, s.pool_size, s.lr_g, s.lr_z, s.lr_meta) == (4, 64, 2e-4, 0.01, 1e-4)
  assert (r.kd.batch_size, r.kd.temperature, r.kd.crop_scale) == (4, 5.0, (0.08, 1.0))
  assert (r.teacher, r.student, r.kd_lr, r.kd_pool) == ('resnet50_imagenet',) * 2 + (0.1, 64)
  with pytest.raises(ValueError, match='imagenet_override'):
    ss.parse_overrides('size=3')


def test_filter_grad_speed_quick(tmp_path):
  """The filter-gradient benchmark's quick path: the three stride-1 implementations
  (shifted-window matmuls, shifted g, one conv over the batch) give the same dk."""
  from benchmarks import filter_grad_speed  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'fg.json'
  result = filter_grad_speed.main(['--quick', '--repeats=1', f'--out={out}'])
  assert json.loads(out.read_text())['rows'].keys() == filter_grad_speed.QUICK.keys()
  for row in result['rows'].values():
    assert set(row['ms']) == {'taps', 'shift_g', 'as_conv'}
    assert all(t > 0 for t in row['ms'].values())
    assert max(row['max_rel_diff_vs_taps'].values()) < 1e-5
