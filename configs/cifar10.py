"""CMI (and baselines) on CIFAR-10: every teacher->student row of the paper's Table 1.

  python -m experiments.run --config=configs/cifar10.py:wrn40_2-wrn16_1 \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn_40_2.pth \
      --config.data.dir=data/cifar10 --workdir=runs/c10_wrn40_2-wrn16_1

Rows: resnet34-resnet18, vgg11-resnet18, wrn40_2-wrn16_1 (default), wrn40_2-wrn40_1,
wrn40_2-wrn16_2. Add `,method=<preset>` for a baseline or an ablation (deepinv, dafl,
zskt, dfq, dfad, cmi_no_contrast, cmi_no_adv, cmi_no_generator, cmi_head_none,
cmi_head_linear, cmi_two_stage), a successor method (nayer: `,epochs=100|200|300` for
NAYER_100/200/300, default 200) and `,quick` for a seconds-long smoke run.
Defaults are the published hyperparameters (200 epochs x 400 KD steps, 200 generator
steps per round): a multi-GPU-day job; expected student accuracy in the README table
(CMI wrn40_2->wrn16_1: 90.01%). The teacher checkpoint is a reference .pth
(converted on the fly) or a directory from experiments/convert_teacher.py.

`,preinverted` is the authors' adversarial CMI script as published (90.01 %): 40 epochs
of 2000 KD steps, oh 0.5, KD batches from the pool plus their ~50k pre-inverted images
(kd.init_pool, default run/cmi-preinverted-wrn402, where their README extracts them):

  python -m experiments.run --config=configs/cifar10.py:wrn40_2-wrn16_1,preinverted \
      --config.kd.init_pool=run/cmi-preinverted-wrn402 \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn_40_2.pth \
      --config.data.dir=data/cifar10 --workdir=runs/c10_adv_cmi
"""

from configs.common import make_dataset_config


def get_config(arg=None):
  return make_dataset_config('cifar10', arg)
