"""Data-free KD: synthesis rounds alternating with student KD, as the reference does.

  python -m experiments.run --config=configs/fashion_mnist.py --workdir=runs/fmnist_cmi
  python -m experiments.run --config=configs/cifar10.py:wrn40_2-wrn16_1 \
      --config.teacher.checkpoint=path/to/cifar10_wrn_40_2.pth --workdir=runs/c10

Each epoch runs (ep_steps // kd_steps) times: one synthesis call (a CMI round, or
generator steps for the GAN baselines), then kd_steps student steps; then the
student is evaluated on the real test split when it is available. The workdir
receives full-state checkpoints (resumed automatically), metrics.jsonl, a PNG
grid of each round's images, plots, and summary.json. This is the only module
that reads a whole ConfigDict.
"""

import os
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
  runner.maybe_initialize_distributed(cfg)
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{cfg.data.name}_{cfg.method}_{cfg.teacher.arch}-{cfg.student.arch}')
  t0 = time.time()
  summary = runner.run(cfg, workdir)
  if 'stopped_at_round' in summary:
    return
  acc = summary.get('student_accuracy')
  print(f'Done in {time.time() - t0:.0f} s: {cfg.method} {cfg.teacher.arch} -> '
        f'{cfg.student.arch}, student accuracy '
        f'{"n/a (no test data)" if acc is None else f"{acc:.2f}%"}; '
        f'outputs in {os.path.abspath(workdir)}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
