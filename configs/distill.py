"""KD of a student on a given transfer set: the reference's vanilla_kd.py
(zoo-and-datasets.md section 6.2), behind experiments/distill.py.

  python -m experiments.distill --teacher=teachers/fashion_mnist_wrn_16_2 \
      --student=wrn_16_1 --data=synthetic/fmnist_cmi/synthetic.npz --workdir=runs/kd_fmnist
  python -m experiments.distill --config=configs/distill.py:nonadv_cmi \
      --teacher=checkpoints/pretrained/cifar10_wrn_40_2.pth --config.teacher.arch=wrn_40_2 \
      --config.data.name=cifar10 --config.data.dir=data/cifar10 --student=wrn_16_1 \
      --data=run/cmi-preinverted-wrn402 --workdir=runs/nonadv_cmi

--data (data.transfer) is a synthetic.npz (experiments/synthesize.py), a folder of
images (recursive, unlabeled: the authors' pre-inverted set) or a dataset name (its
train split from data.transfer_dir or data.dir). The teacher's dataset (data.name;
'' = the teacher card's) gives the normalisation, the train augmentation the transfer
images get (crop + flip where the dataset has them) and the test split, evaluated
every epoch when present.

Defaults are vanilla_kd.py's (DF:vanilla_kd.py:31-44, 231-233, 320-329): SGD lr 0.1,
momentum 0.9, weight decay 1e-4, batch 128, 200 epochs, lr x 0.1 at epochs 120, 150 and
180, loss alpha x KL(teacher/T || student/T) x T^2 with alpha 1, T 1, plus beta x CE on
the transfer set's labels (kd.label_weight, default 0; the README's real-data example
uses 0.1). `:nonadv_cmi` is the published non-adversarial CMI script
(nonadv_cmi_cifar10_wrn402_wrn161.sh: T 20, beta 0; 87.38 % on CIFAR-10 wrn_40_2 ->
wrn_16_1 from the pre-inverted folder): a GPU job of 200 x 390 steps. `:quick` is a
seconds-long smoke variant for tests. Epochs drop the last partial batch (a fixed
batch shape, one compilation); re-running the same command resumes.
"""

import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, quick=False, nonadv_cmi=False, epochs=200)
  C = ml_collections.ConfigDict
  c = C()
  c.seed = 0
  # checkpoint: a teacher directory or a reference .pth (then arch and data.name too).
  c.teacher = C(dict(checkpoint='', arch=''))
  c.student = C(dict(arch=''))
  # transfer: the --data flag. name: the teacher's dataset ('' = its card's); dir: where
  # its test split (and a named transfer set) lies; transfer_dir: a named transfer set's
  # folder ('' = dir); resize: resize + center-crop transfer images of another size to the
  # teacher's (else an error); transfer_limit: first N transfer images (0: all);
  # image_size/mean/std/num_classes: as the runner's (data.name=image_folder needs them).
  c.data = C(dict(transfer='', name='', dir='', transfer_dir='', backend='files', resize=False,
                  transfer_limit=0, eval_batch_size=500, eval_limit=0, image_size=0, mean=(),
                  std=(), num_classes=0))
  c.kd = C(dict(batch_size=128, epochs=a['epochs'], lr=0.1, momentum=0.9, weight_decay=1e-4,
                schedule='multistep', milestones=(120, 150, 180), gamma=0.1,
                temperature=1.0, kd_weight=1.0, label_weight=0.0, augment=True))
  c.mesh = C(dict(num_devices=0))  # 0: all devices, batches split along 'data'
  c.faults = C(dict(allow_config_change=False))  # experiments/guard.py check_resume
  # Rows every every_steps steps; checkpoints every checkpoint_every_steps steps and at
  # epoch ends; stop_after_steps > 0: checkpoint and exit after about that many steps.
  c.log = C(dict(every_steps=50, checkpoint_every_steps=500, max_checkpoints=2,
                 async_checkpoints=True, stop_after_steps=0, grid_images=100))
  if a['nonadv_cmi']:
    c.kd.temperature, c.kd.label_weight = 20.0, 0.0
  if a['quick']:
    c.kd.batch_size, c.kd.milestones = 32, (2,)
    c.kd.epochs = 3 if a['epochs'] == 200 else a['epochs']
    c.data.eval_limit, c.data.eval_batch_size = 500, 250
    c.log.every_steps, c.log.checkpoint_every_steps = 2, 4
  return c
