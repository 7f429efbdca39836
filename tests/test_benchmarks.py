"""The benchmark scripts' own small pieces (the runs themselves live in benchmarks/)."""

import json

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
