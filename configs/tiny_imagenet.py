"""CMI (and baselines) on Tiny-ImageNet: the paper's Table 1 row resnet34 -> resnet18.

  python -m experiments.run --config=configs/tiny_imagenet.py:resnet34-resnet18 \
      --config.teacher.checkpoint=runs/teacher_tiny_imagenet_resnet34/teacher \
      --config.data.dir=data --workdir=runs/tiny_resnet34-resnet18

One row, `resnet34-resnet18` (the default): the CIFAR-style ResNets (3x3 stem, no
max-pool) at 64x64, as the benchmark's names mean them and NAYER runs this dataset
(zoo-and-datasets.md section 4). `,method=<preset>` selects a baseline, an ablation or a
successor method as in configs/cifar10.py; `,quick` is a seconds-long smoke run. The
teacher: a directory from `experiments/train_teacher.py --config=configs/teacher.py:
tiny_imagenet,resnet34` (no Tiny-ImageNet teacher is published) or a reference .pth
(default path: the reference's `checkpoints/pretrained/tiny_imagenet_resnet34.pth`).
data.dir: the folder holding `tiny-imagenet-200/` (or that folder itself).

Published (the paper's Table 1): T 66.44, S 64.87, DFQ 63.73, CMI 64.01 (student top-1 on
the 10k val split). What the reference code fixes for 64x64 inputs, and this config
has: normalisation 0.5 / 0.5, KD view crop 64 pad 4 + flip, CMI's global view crop 64
pad 4 and local view RandomResizedCrop 64 scale (0.25, 1), the CMI generator at
img_size 64 (l1: Linear(256 -> 128 x 16 x 16), 8.64M parameters), contrastive features =
the inputs of layer1..layer4 (512 dims).

NOT published (zoo-and-datasets.md section 4): CMI's and DFQ's loss weights, g_steps,
rounds, KD steps and epochs, batch sizes, the teacher and student recipe. cmi_jax's
choice: the CIFAR CMI recipe of base_config unchanged (bn 1, oh 1, adv 0.5, cr 0.8;
200 generator steps of batch 256 and 400 KD steps of batch 128 per round, 200 epochs;
bank 40960, pool 51200 = every image), because it is the only CMI recipe the authors
published (DF:README.md:50), so the row differs from the CIFAR rows in the data alone;
a GPU-days job, as on CIFAR, at 4x the pixels. FastDFKD keeps its
resnet34 row's weights (adv 1.33, oh 0.5); NAYER takes its own Tiny-ImageNet scripts'
settings (configs/common.py NAYER_DATASET; `,epochs=100|200|300` = NAYER_100/200/300).
"""

from configs.common import PAPER_ROWS, make_dataset_config

ROWS = {'resnet34-resnet18': PAPER_ROWS['resnet34-resnet18']}


def get_config(arg=None):
  c = make_dataset_config('tiny_imagenet', arg, rows=ROWS, default_row='resnet34-resnet18')
  # The loader finds tiny-imagenet-200/ inside data.dir (the reference's data_root).
  c.data.dir = 'data'
  return c
