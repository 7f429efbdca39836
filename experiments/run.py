"""Data-free KD: synthesis rounds alternating with student KD, as the reference does.

  python -m experiments.run --config=configs/fashion_mnist.py --workdir=runs/fmnist_cmi
  python -m experiments.run --config=configs/cifar10.py:wrn40_2-wrn16_1 \
      --config.teacher.checkpoint=path/to/cifar10_wrn_40_2.pth --workdir=runs/c10

Each epoch runs (ep_steps // kd_steps) times: one synthesis call (a CMI round, or
generator steps for the GAN baselines), then kd_steps student steps; then the
student is evaluated on the real test split when it is available. The workdir
receives full-state checkpoints (asynchronous, every log.checkpoint_every_rounds
rounds and at the end; resumed automatically), metrics.jsonl, a PNG grid of each
round's images, plots, and summary.json. SIGTERM/SIGINT stop the run cleanly
after the current round with a checkpoint; the same command resumes it. This is the only module
that reads a whole ConfigDict.
"""

import os
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default runs/<config name>).')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from experiments import runner  # pylint: disable=g-import-not-at-top  (after flag parsing)
  cfg = _CONFIG.value
  runner.apply_runtime(cfg)  # process-wide XLA flags: before any backend starts
  runner.maybe_initialize_distributed(cfg)
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{cfg.data.name}_{cfg.method}_{cfg.teacher.arch.rsplit(":", 1)[-1]}'
      f'-{cfg.student.arch}')  # an own model ('package.module:factory'): the factory's name
  t0 = time.time()
  summary = runner.run(cfg, workdir)
  if 'stopped_at_round' in summary:
    if 'signal' in summary:
      print('Resume with the same command: python -m experiments.run '
            + shlex.join(sys.argv[1:]))
    return
  acc = summary.get('student_accuracy')
  if acc is not None:
    print(f'Student accuracy on the {cfg.data.name} test split: {acc:.2f}% '
          f'(best epoch {summary["best_student_accuracy"]:.2f}%)')
  print(runner.summary_line(summary, time.time() - t0))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  from cmi_jax import errors  # pylint: disable=g-import-not-at-top
  app.run(errors.main_guard(main), flags_parser=errors.parse_flags)  # user errors: one line
