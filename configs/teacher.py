"""Train a teacher (or the tables' "S." student from scratch) on any dataset with the
reference recipe (DF:train_scratch.py; zoo-and-datasets.md section 6.1).

  python -m experiments.train_teacher --config=configs/teacher.py:cifar10,wrn_40_2 \
      --config.data.dir=data/cifar10 --workdir=runs/teacher_cifar10_wrn_40_2
  python -m experiments.train_teacher --config=configs/teacher.py:tiny_imagenet,resnet34 \
      --config.data.dir=data --workdir=runs/teacher_tiny_imagenet_resnet34
  python -m experiments.train_teacher --config=configs/teacher.py:imagenet,resnet50_imagenet \
      --config.data.dir=data/ILSVRC2012 --workdir=runs/teacher_imagenet_resnet50

`:<dataset>,<arch>`: dataset one of DATASETS below, arch any cmi_jax classifier name
(`cmi_jax.models.CLASSIFIERS`); the arch may be left out where the paper has a teacher
(cifar10 / cifar100 wrn_40_2, tiny_imagenet resnet34, fashion_mnist wrn_16_2, imagenet
the torchvision-layout resnet50_imagenet of the FastDFKD rows).
Recipe, one for every dataset as the reference has it: SGD lr 0.1, momentum 0.9 (no
Nesterov), weight decay 1e-4, batch 256, 200 epochs, lr x 0.1 at epochs 120, 150 and
180 (MultiStepLR), cross-entropy, the dataset's own train augmentation (DF:registry.py;
zoo-and-datasets.md section 3: crop pad 4 + flip for cifar10/100 and tiny_imagenet,
none for svhn and mnist (mnist resized to 32), RandomResizedCrop 224 scale (0.08, 1) +
flip for imagenet), the test split evaluated every epoch. ImageNet's train split is
not held in memory: each batch is decoded from its JPEGs on the host, one step ahead
(experiments/train_teacher.py), and evaluated at Resize 256 + CenterCrop 224 on val/.
`,epochs=N` shortens the run (the milestones stay); `,quick` is a seconds-long smoke
variant for tests (3 epochs, milestones 1 and 2; imagenet: 4 classes at 32x32 from a
small folder, train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, batch 8). Runtime: a GPU job
(CIFAR resnet34: ~200 x 196 steps; Tiny-ImageNet: 200 x 390 steps at 64x64; ImageNet:
200 x 5004 steps at 224, bound by JPEG decoding on the host's cores unless they keep
up with the device). Expected top-1 where the paper gives
one: its Table 1 "T." column (e.g. CIFAR-10 wrn_40_2 94.87, Tiny-ImageNet resnet34
66.44; the README's tables). Re-running the same command resumes; the teacher is
exported to <workdir>/teacher, which `--config.teacher.checkpoint=` of the KD configs reads.
"""

import ml_collections

from configs.common import parse_arg

# Every dataset of cmi_jax.data (imagenet's train split streams from its files).
DATASETS = ('cifar10', 'cifar100', 'fashion_mnist', 'image_folder', 'imagenet', 'mnist',
            'svhn', 'tiny_imagenet')
# The paper's teacher per dataset (Table 1; the shipped Fashion-MNIST teacher; FastDFKD's
# ImageNet teacher).
DEFAULT_ARCH = {'cifar10': 'wrn_40_2', 'cifar100': 'wrn_40_2', 'tiny_imagenet': 'resnet34',
                'fashion_mnist': 'wrn_16_2', 'imagenet': 'resnet50_imagenet'}
# imagenet,quick: the fake folder's classes and image size (data.num_classes, data.image_size).
QUICK_IMAGENET = {'num_classes': 4, 'image_size': 32}


def check_choice(field: str, value: str, choices) -> None:
  """One error naming the bad value and every allowed one."""
  if value not in choices:
    raise ValueError(f'Unknown {field} {value!r} in configs/teacher.py:<dataset>,<arch>; '
                     f'choose one of {sorted(choices)}.')


def get_config(arg=None):
  a = parse_arg(arg, _positional=('dataset', 'arch'), dataset='', arch='', quick=False,
                epochs=200)
  from cmi_jax import models  # pylint: disable=g-import-not-at-top
  check_choice('dataset', a['dataset'], DATASETS)
  arch = a['arch'] or DEFAULT_ARCH.get(a['dataset'], '')
  if not arch:
    raise ValueError(f'configs/teacher.py:{a["dataset"]} needs an architecture: '
                     f'configs/teacher.py:{a["dataset"]},<arch>, one of '
                     f'{sorted(models.CLASSIFIERS)}.')
  check_choice('arch', arch, models.CLASSIFIERS)
  from cmi_jax import data  # pylint: disable=g-import-not-at-top
  size = 32 if a['dataset'] == 'mnist' else data.DATASETS[a['dataset']].image_shape[0]
  fixed = models.FIXED_INPUT_SIZE.get(models.canonical_name(arch))
  if fixed and size and size != fixed:
    raise ValueError(f'arch {arch!r} takes {fixed}x{fixed} inputs only; {a["dataset"]} is '
                     f'{size}x{size}.')
  C = ml_collections.ConfigDict
  c = C()
  c.seed = 0
  # image_size/mean/std/num_classes: 0 / () keep the dataset's own (image_folder needs
  # the first three); MNIST at 32 as the reference's registry resizes it.
  c.data = C(dict(name=a['dataset'], dir='', backend='files', train_limit=0, test_limit=0,
                  image_size=32 if a['dataset'] == 'mnist' else 0, mean=(), std=(),
                  num_classes=0))
  c.model = C(dict(arch=arch))
  c.train = C(dict(
      epochs=a['epochs'], batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
      weight_decay=1e-4, schedule='multistep', milestones=(120, 150, 180), gamma=0.1,
      eval_batch_size=500))
  c.log = C(dict(every_steps=50, checkpoint_every_steps=500))
  c.export_dir = ''  # '' -> <workdir>/teacher
  if a['quick']:
    c.data.train_limit, c.data.test_limit = 512, 256
    c.train.epochs, c.train.milestones = 3, (1, 2)
    c.train.batch_size, c.train.eval_batch_size = 64, 128
    c.log.every_steps, c.log.checkpoint_every_steps = 2, 5
    if a['dataset'] == 'imagenet':
      c.data.num_classes, c.data.image_size = (QUICK_IMAGENET['num_classes'],
                                               QUICK_IMAGENET['image_size'])
      c.train.batch_size, c.train.eval_batch_size = 8, 8
  return c
