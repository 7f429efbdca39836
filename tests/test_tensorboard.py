"""Issue 11, item 6: metrics also go to TensorBoard event files (tensorboardX, no
TensorFlow); without tensorboardX the writer still writes metrics.jsonl and says
once that TensorBoard logging is off. The event files are read back here with a
TFRecord parser of our own and tensorboardX's Event proto (no TensorBoard needed)."""

import builtins
import glob
import os
import struct

import pytest

from cmi_jax import report

event_pb2 = pytest.importorskip('tensorboardX.proto.event_pb2')


def read_events(logdir):
  """{tag: [(step, value), ...]} from every event file under `logdir` (TFRecord:
  u64 length, u32 masked crc, payload, u32 masked crc)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      raw = f.read()
    pos = 0
    while pos < len(raw):
      (length,) = struct.unpack('<Q', raw[pos:pos + 8])
      payload = raw[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_scalars_in_event_files(tmp_path):
  w = report.MetricWriter(str(tmp_path))
  w.write_scalars(1, {'loss': 2.5, 'student_accuracy': 10.0, 'epoch': 1, 'flag': True,
                      'bad': float('nan'), 'name': 'cmi'})
  w.write_scalars(2, {'loss': 1.25, 'kd_loss': 0.5})
  w.close()
  events = read_events(str(tmp_path / 'tensorboard'))
  assert events == {'loss': [(1, 2.5), (2, 1.25)], 'student_accuracy': [(1, 10.0)],
                    'epoch': [(1, 1.0)], 'kd_loss': [(2, 0.5)]}
  assert [r['loss'] for r in report.read_metrics(w.path)] == [2.5, 1.25]


def test_resume_purges_steps_after_checkpoint(tmp_path):
  """A resumed run (truncate_after) writes a purge marker so TensorBoard hides the
  crashed run's steps after the checkpoint; the jsonl keeps each step once."""
  w = report.MetricWriter(str(tmp_path))
  for s in (1, 2, 3):
    w.write_scalars(s, {'loss': float(s)})
  w.close()
  w = report.MetricWriter(str(tmp_path))
  w.truncate_after(1)
  w.write_scalars(2, {'loss': 20.0})
  w.close()
  assert [(r['step'], r['loss']) for r in report.read_metrics(w.path)] == [(1, 1.0), (2, 20.0)]
  files = sorted(glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*')))
  assert len(files) == 2
  with open(files[-1], 'rb') as f:
    raw = f.read()
  events, pos = [], 0
  while pos < len(raw):
    (length,) = struct.unpack('<Q', raw[pos:pos + 8])
    events.append(event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length]))
    pos += 16 + length
  starts = [e for e in events if e.HasField('session_log')]
  assert starts and starts[0].step == 2  # TensorBoard purges steps >= 2 of earlier files


def test_without_tensorboardx(tmp_path, monkeypatch, capsys):
  real_import = builtins.__import__

  def no_tensorboardx(name, *args, **kwargs):
    if name.startswith('tensorboardX'):
      raise ImportError('No module named tensorboardX')
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, '__import__', no_tensorboardx)
  monkeypatch.setattr(report, '_TENSORBOARD_NOTE_SHOWN', False)
  for sub in ('a', 'b'):
    w = report.MetricWriter(str(tmp_path / sub))
    w.write_scalars(1, {'loss': 3.0})
    w.close()
    assert report.read_metrics(w.path)[0]['loss'] == 3.0
    assert not os.path.exists(tmp_path / sub / 'tensorboard')
  out = capsys.readouterr().out
  assert out.count('TensorBoard logging is off') == 1  # once per process
  assert 'pip install "cmi_jax[tensorboard]"' in out


def test_disabled_writer_writes_nothing(tmp_path):
  w = report.MetricWriter(str(tmp_path / 'w'), enabled=False)
  w.write_scalars(1, {'loss': 1.0})
  w.close()
  assert not os.path.exists(tmp_path / 'w')
