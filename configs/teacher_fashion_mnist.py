"""Train a classifier on real Fashion-MNIST: the shipped teacher and the
"student from scratch" row.

  python -m experiments.train_teacher --config=configs/teacher_fashion_mnist.py \
      --workdir=runs/teacher_wrn_16_2
  python -m experiments.train_teacher --config=configs/teacher_fashion_mnist.py:wrn_16_1 \
      --workdir=runs/scratch_wrn_16_1

wrn_16_2, 10 epochs: ~6 min/epoch on a 2-core CPU, >= 92% top-1 on the 10k
test split (the README records the figure). Re-running the same command with
the same workdir resumes from the last checkpoint. ':quick' is a seconds-long
smoke variant for tests.
"""

import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, _positional='arch', arch='wrn_16_2', quick=False, epochs=10)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(name='fashion_mnist', dir='', backend='files',
                                          train_limit=0, test_limit=0))
  c.model = ml_collections.ConfigDict(dict(arch=a['arch']))
  c.train = ml_collections.ConfigDict(dict(
      epochs=a['epochs'], batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
      weight_decay=5e-4, eval_batch_size=1000))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, checkpoint_every_steps=200))
  # Where the final teacher is exported (teacher_io format); '' -> <workdir>/teacher.
  c.export_dir = ''
  if a['quick']:
    c.data.train_limit, c.data.test_limit = 512, 256
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 2, 64, 128
    c.log.every_steps, c.log.checkpoint_every_steps = 2, 5
  return c
