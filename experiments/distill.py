"""KD of a student on a transfer set (the reference's vanilla_kd.py).

  python -m experiments.distill --teacher=teachers/fashion_mnist_wrn_16_2 --student=wrn_16_1 \
      --data=synthetic/fmnist_cmi/synthetic.npz --workdir=runs/kd_fmnist
  python -m experiments.distill --config=configs/distill.py:nonadv_cmi \
      --teacher=checkpoints/pretrained/cifar10_wrn_40_2.pth --config.teacher.arch=wrn_40_2 \
      --config.data.name=cifar10 --config.data.dir=data/cifar10 --student=wrn_16_1 \
      --data=run/cmi-preinverted-wrn402 --workdir=runs/nonadv_cmi

--data: experiments/synthesize.py's synthetic.npz, a folder of images (recursive,
unlabeled, e.g. the authors' pre-inverted set) or a dataset name (its train split).
Images must have the teacher's size and channels (--config.data.resize=True resizes
them). Hyperparameters live in configs/distill.py (--config, default that file; fields
by --config.<field>=); --teacher, --student and --data set teacher.checkpoint,
student.arch and data.transfer. Each epoch is followed by an evaluation on the teacher
dataset's real test split when it is there. The workdir receives checkpoints (resumed
by the same command; SIGTERM/SIGINT stop cleanly), metrics.jsonl, TensorBoard events
(with tensorboardX), images/transfer_set.png, accuracy.png and summary.json.
"""

import os
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'distill.py'), 'Config file (default configs/distill.py).',
    lock_config=True)
_TEACHER = flags.DEFINE_string('teacher', None, 'Teacher directory or reference .pth '
                               '(config.teacher.checkpoint).')
_STUDENT = flags.DEFINE_string('student', None, 'Student architecture (config.student.arch).')
_DATA = flags.DEFINE_string('data', None, 'Transfer set: synthetic.npz, image folder or dataset '
                            'name (config.data.transfer).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default runs/kd_<student>).')


def config_from_flags():
  """The config with --teacher, --student and --data written into their fields."""
  cfg = _CONFIG.value
  for flag, field in ((_TEACHER, ('teacher', 'checkpoint')), (_STUDENT, ('student', 'arch')),
                      (_DATA, ('data', 'transfer'))):
    if flag.value is not None:
      cfg[field[0]][field[1]] = flag.value
  return cfg


def main(argv):
  distill_main(argv)


def distill_main(argv):
  """main, returning the run's summary (tests call it in-process)."""
  from cmi_jax import errors  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise errors.ConfigError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from experiments import transfer_kd  # pylint: disable=g-import-not-at-top  (after flags)
  cfg = config_from_flags()
  workdir = _WORKDIR.value or os.path.join('runs', f'kd_{cfg.student.arch or "student"}')
  t0 = time.time()
  summary = transfer_kd.run(cfg, workdir)
  if 'stopped_at_step' in summary:
    if 'signal' in summary:
      print('Resume with the same command: python -m experiments.distill '
            + shlex.join(sys.argv[1:]))
    return summary
  acc = summary.get('student_accuracy')
  if acc is not None:
    print(f'Student accuracy on the {summary["dataset"]} test split: {acc:.2f}% '
          f'(best epoch {summary["best_student_accuracy"]:.2f}%)')
  print(transfer_kd.summary_line(summary, time.time() - t0))
  return summary


if __name__ == '__main__':
  from cmi_jax import errors  # pylint: disable=g-import-not-at-top
  app.run(errors.main_guard(main), flags_parser=errors.parse_flags)  # user errors: one line
