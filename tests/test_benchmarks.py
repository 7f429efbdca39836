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
  out = tmp_path / 'speed.json'
  argv = ['--quick', '--out', str(out)] + ([] if has_torch else ['--no_torch'])
  result = synthesis_speed.main(argv)
  assert json.loads(out.read_text()) == result
  rows = {r['setting']: r for r in result['rows']}
  assert set(rows) == set(synthesis_speed.QUICK)
  for row in rows.values():
    assert row['jax_s'] > 0 and all(t > 0 for t in row['jax_round_s']['2'])
    prof = row['profile']
    assert abs(sum(prof['fraction'].values()) - 1.0) < 1e-6
    # Both workloads run convolutions forward and backward, and the rest.
    assert prof['seconds']['conv_fwd'] > 0 and prof['seconds']['conv_input_grad'] > 0
    assert prof['seconds']['elementwise_other'] > 0
    assert ('ratio_jax_to_torch' in row) == has_torch
  # The synthesis round also differentiates the generator's filters.
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
