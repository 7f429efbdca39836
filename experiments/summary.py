"""What a run leaves behind besides checkpoints: the per-round metrics row of a
synthesis call, the plots, the class grids, the summary and its one-line form."""

import os
from typing import Any, Dict

import jax
import numpy as np

from cmi_jax import parallel, report

ROUND_AXIS = 'synthesis round (warm-up included)'


def synthesis_row(m: Dict[str, Any]) -> Dict[str, float]:
  """Per-round scalars: the last step of each loss term, the first step's total,
  and the round's diagnostics."""
  out = {}
  for k, v in m.items():
    a = np.asarray(v)
    if a.ndim == 1:
      out[k] = float(a[-1])
      if k == 'loss':
        out['loss_first'] = float(a[0])
    else:
      out[k] = float(a)
  return out


def plots(workdir: str, writer: report.MetricWriter) -> None:
  """accuracy.png and losses.png in the workdir, against the synthesis round (one
  metrics row per round; warm-up rounds included)."""
  if not writer.enabled or not os.path.exists(writer.path):
    return
  rows = report.read_metrics(writer.path)
  report.plot_metrics(rows, os.path.join(workdir, 'accuracy.png'),
                      {'student test accuracy (%)': ['student_accuracy'],
                       'KD': ['kd_loss'], 'teacher-student agreement (%)': ['kd_agreement']},
                      xlabel=ROUND_AXIS)
  report.plot_metrics(rows, os.path.join(workdir, 'losses.png'),
                      {'synthesis loss': ['loss', 'loss_first', 'best_loss'],
                       'terms': ['l_bn', 'l_oh', 'l_adv', 'l_cr', 'l_balance', 'l_act', 'l_tv'],
                       'diagnostics': ['confidence', 'feature_diversity', 'class_entropy']},
                      xlabel=ROUND_AXIS)


def summarize(cfg, plan, history, meta, workdir, seconds) -> Dict[str, Any]:
  accs = [h['student_accuracy'] for h in history if 'student_accuracy' in h]
  return {
      'method': cfg.method, 'dataset': cfg.data.name, 'teacher': cfg.teacher.arch,
      'student': cfg.student.arch, 'teacher_accuracy': meta.get('teacher_accuracy'),
      'student_accuracy': accs[-1] if accs else None,
      'best_student_accuracy': max(accs) if accs else None,
      'epochs': plan.epochs, 'rounds': plan.total_rounds, 'history': history,
      'seconds_this_session': seconds, 'workdir': os.path.abspath(workdir),
      'evaluation': 'on' if accs else 'off (no test data)',
      'student_teacher_ratio': (accs[-1] / meta['teacher_accuracy']
                                if accs and meta.get('teacher_accuracy') else None),
      'images_dir': 'images', 'plots': ['accuracy.png', 'losses.png'],  # in the workdir
      'jax_version': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }



def summary_line(summary, seconds: float) -> str:
  """The run's one-line result: student and teacher accuracy, their ratio, and
  where the image grids and plots are."""
  def pct(v):
    return 'n/a (no test data)' if v is None else f'{v:.2f}%'
  def where(name):  # summary.json holds paths relative to the workdir
    return os.path.join(summary['workdir'], name)
  ratio = summary.get('student_teacher_ratio')
  return (f'Done in {seconds:.0f} s: {summary["method"]} student {summary["student"]} '
          f'{pct(summary["student_accuracy"])}, teacher {summary["teacher"]} '
          f'{pct(summary["teacher_accuracy"])}, ratio '
          f'{"n/a" if ratio is None else f"{ratio:.4f}"}; image grids in '
          f'{where(summary["images_dir"])}, plots {", ".join(map(where, summary["plots"]))}')


def save_grid(workdir: str, round_index: int, images, targets, num_classes: int,
              per_class: int) -> None:
  """The round's images as a class grid, images/round_NNNNN.png (every process
  takes part in the fetch of a sharded array; process 0 writes)."""
  images_np, targets_np = parallel.fetch((images, targets))  # collective: every process
  if parallel.is_main_process():
    grid = report.class_grid(images_np, targets_np, num_classes, per_class)
    report.save_png(os.path.join(workdir, 'images', f'round_{round_index:05d}.png'), grid,
                    scale=2 if images_np.shape[1] <= 32 else 1)
