"""FastDFKD's ImageNet rows (Fast-50, as the logged runs did them), CMI and DeepInversion at 224.

  python -m experiments.run --config=configs/imagenet.py:resnet50-resnet18 \
      --config.teacher.checkpoint=checkpoints/pretrained/imagenet_resnet50_imagenet.pth \
      --config.data.dir=data --workdir=runs/imagenet_fast50_r50-r18

Rows (the torchvision ResNet-50 teacher): `resnet50-resnet50` (default),
`resnet50-resnet18`, `resnet50-mobilenetv2`. Method `fast_imagenet` (default; preset in
cmi_jax/synthesis/presets.py) is the logged Fast-50 recipe (zoo-and-datasets.md section 5:
FD:logs/log-imagenet-resnet50_imagenet-*-FastDFKD_50.txt), adv 1.0 on the resnet18 row and
0.1 on the others. `,method=cmi` (CMI's generator at 224, contrastive features
'stages') and `,method=deepinv` (2000 pixel steps, DeepInv-2k) run the same schedule;
their ImageNet settings are not published (cmi_jax's choice: the presets' losses on the
Fast-50 schedule). `,quick`: a seconds-long run on a fake ImageNet folder (4 classes,
train/<wnid>/*.JPEG and val/<wnid>/*.JPEG in data.dir) with random wrn_16_1 nets at
16x16 (tests/test_imagenet.py).

Expected (FastDFKD's README = the logs' best epochs): student top-1 68.61 / 53.45 / 43.02
on the 50k val images; 400 epochs x 10 rounds (4000 synthesis rounds of 50 steps, 400k
images) with 100 KD steps each: the logs show 46-61 h on a shared 8-GPU node.
The pool keeps all 400k images: 60.2 GB of uint8 per device in the default
kd.pool_mode='device'. Beside the float32 round at batch 100 that fits a 141 GB device
(~800k images) but not an 80 GB one (~397k; ~470k with synthesis.remat=True), by XLA's
CPU memory analysis (benchmarks/results/pool_memory.json): on 80 GB devices add
--config.kd.pool_mode=sharded (over >= 2 devices: 7.5 GB of pool each over 8) and
--config.log.pool_checkpoint=incremental (checkpoints write the new rounds, not 60 GB).
data.dir: the folder holding train/ and val/ (or ILSVRC2012/ with them). The teacher:
torchvision's resnet50-19c8e357.pth (a raw legacy state_dict; read as is) or a
converted directory (experiments/convert_teacher.py).
"""

from configs.common import apply_quick, base_config, parse_arg

ROWS = {
    'resnet50-resnet50': ('resnet50_imagenet', 'resnet50_imagenet'),
    'resnet50-resnet18': ('resnet50_imagenet', 'resnet18_imagenet'),
    'resnet50-mobilenetv2': ('resnet50_imagenet', 'mobilenetv2_imagenet'),
}
# The logged runs' adversarial weight per row (the resnet18 row's is 1.0; bn = oh = 0.1).
ADV = {'resnet50-resnet50': 0.1, 'resnet50-resnet18': 1.0, 'resnet50-mobilenetv2': 0.1}
METHODS = ('fast_imagenet', 'cmi', 'deepinv')
# The Fast-50 schedule every method runs here: 400 epochs of 10 rounds, 100 KD steps of
# batch 100 per round, T 5, SGD lr 0.1 cosine to 0 (FD:datafree_kd_imagenet.py).
SCHEDULE = {'batch_size': 100, 'kd_steps': 100, 'ep_steps': 1000, 'epochs': 400,
            'temperature': 5.0, 'lr': 0.1, 'lr_min': 0.0, 'pre_rounds': 0}
# The quick run's fake folder, size and teacher.
QUICK = {'num_classes': 4, 'image_size': 16, 'arch': 'wrn_16_1'}


def get_config(arg=None):
  a = parse_arg(arg, _positional='row', row='resnet50-resnet50', method='fast_imagenet',
                quick=False)
  if a['row'] not in ROWS:
    raise ValueError(f'Unknown row {a["row"]!r}; choose one of {sorted(ROWS)}.')
  if a['method'] not in METHODS:
    raise ValueError(f'method={a["method"]!r}: configs/imagenet.py has {list(METHODS)} '
                     '(other presets have no ImageNet settings here).')
  c = base_config('imagenet', a['method'])
  c.teacher.arch, c.student.arch = ROWS[a['row']]
  c.teacher.checkpoint = 'checkpoints/pretrained/imagenet_resnet50_imagenet.pth'
  c.data.dir = 'data'
  # Keep XLA:CPU's YNNPACK fusions here: at 224 pixels turning them off (the main command's
  # choice) made a Fast-50 round's work x1.18 slower on jax 0.12 (synthesis iteration
  # x0.89, KD step x1.39; benchmarks/results/synthesis_speed_imagenet_variants.json).
  c.runtime.xla_cpu_ynn_fusions = True
  s = c.synthesis
  if a['method'] == 'fast_imagenet':
    s.weights.adv = c.kd.pre_adv = ADV[a['row']]
  else:
    c.kd.update(SCHEDULE)
    s.batch_size = SCHEDULE['batch_size']
    s.pool_size = SCHEDULE['epochs'] * 10 * s.batch_size  # every image, as Fast-50
    s.feature_layers = 'stages'  # CMI: D = 64 + 256 + 512 + 1024 for the resnet50 teacher
    if a['method'] == 'deepinv':
      s.g_steps = 2000  # DeepInv-2k, the FastDFKD README's baseline
  if a['quick']:
    apply_quick(c)
    c.teacher.checkpoint = 'random'
    c.teacher.arch = c.student.arch = QUICK['arch']
    c.data.num_classes, c.data.image_size = QUICK['num_classes'], QUICK['image_size']
    s.z_life = min(s.z_life, 2)  # a latent redrawn (with a fresh meta-Adam) within the run
    c.data.eval_limit = 8
  return c
