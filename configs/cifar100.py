"""CMI (and baselines) on CIFAR-100: every teacher->student row of the paper's Table 1.

  python -m experiments.run --config=configs/cifar100.py:wrn40_2-wrn16_1 \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar100_wrn_40_2.pth \
      --config.data.dir=data/cifar100 --workdir=runs/c100_wrn40_2-wrn16_1

Same rows, methods, `quick` variant and published hyperparameters as configs/cifar10.py
(see its docstring); 100 classes and CIFAR-100 normalization come from the dataset.
Expected student accuracy in the README table (CMI wrn40_2->wrn16_1: 57.91%). NAYER
(40 steps per loop here): `configs/cifar100.py:wrn40_2-wrn16_2,method=nayer` (NAYER_200;
the authors' plot: about 71.2%).
"""

from configs.common import make_dataset_config


def get_config(arg=None):
  return make_dataset_config('cifar100', arg)
