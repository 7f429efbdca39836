"""What a run leaves besides checkpoints (experiments/summary.py): the plots say
what their x axis counts, and the one-line summary."""

import os

from matplotlib.axes import Axes

from cmi_jax import report
from experiments import summary


def test_plots_label_the_round_axis(tmp_path, monkeypatch):
  """One metrics row per synthesis round (the writer's step): the x axis says so,
  and its values are the rounds."""
  writer = report.MetricWriter(str(tmp_path))
  for r in range(1, 4):
    writer.write_scalars(r, {'round': r, 'loss': 1.0 / r, 'kd_loss': 0.5 * r,
                             'student_accuracy': 10.0 * r})
  writer.close()
  labels, xs = [], []
  original_label, original_plot = Axes.set_xlabel, Axes.plot
  monkeypatch.setattr(Axes, 'set_xlabel',
                      lambda self, label, *a, **k: labels.append(label) or
                      original_label(self, label, *a, **k))
  monkeypatch.setattr(Axes, 'plot', lambda self, x, y, *a, **k: xs.append(list(x)) or
                      original_plot(self, x, y, *a, **k))
  summary.plots(str(tmp_path), writer)
  assert os.path.exists(tmp_path / 'accuracy.png') and os.path.exists(tmp_path / 'losses.png')
  assert labels and set(labels) == {summary.ROUND_AXIS} and 'round' in summary.ROUND_AXIS
  assert xs and all(x == [1, 2, 3] for x in xs)


def test_summary_line_names_accuracies_ratio_and_paths():
  line = summary.summary_line({'method': 'cmi', 'student': 'wrn_16_1', 'teacher': 'wrn_16_2',
                               'student_accuracy': 77.5, 'teacher_accuracy': 93.75,
                               'student_teacher_ratio': 77.5 / 93.75, 'workdir': '/w',
                               'images_dir': 'images', 'plots': ['accuracy.png']}, 12.4)
  assert line == ('Done in 12 s: cmi student wrn_16_1 77.50%, teacher wrn_16_2 93.75%, ratio '
                  '0.8267; image grids in /w/images, plots /w/accuracy.png')
