"""CMI on Fashion-MNIST with the shipped teacher: the README's main command.

  python -m experiments.run --config=configs/fashion_mnist.py --workdir=runs/fmnist_cmi

Teacher: teachers/fashion_mnist_wrn_16_2 (trained by configs/teacher_fashion_mnist.py,
shipped in the repo); student: wrn_16_1 from scratch, data-free. Sized to finish in
about 10 minutes on a 2-core CPU (the README states the accuracy reached). Other
methods: `:method=deepinv` etc. (see cmi_jax/synthesis/presets.py); `:quick` is a
seconds-long smoke run. A baseline keeps its preset's own per-round schedule
(g_steps, kd_steps; DeepInversion and the two-stage recipe are hours on a CPU).
"""

from configs.common import apply_quick, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, _positional='method', method='cmi', quick=False)
  c = base_config('fashion_mnist', a['method'])
  c.teacher.arch, c.teacher.checkpoint = 'wrn_16_2', 'teachers/fashion_mnist_wrn_16_2'
  c.student.arch = 'wrn_16_1'
  s, k = c.synthesis, c.kd
  # CPU-sized schedule: small rounds, few epochs; the loss weights stay the paper's.
  s.batch_size, s.ngf, s.n_neg, s.bank_size = 64, 32, 512, 8192
  k.batch_size = 64
  # A preset's own schedule is part of its method (DeepInversion's 1000 pixel steps, the
  # GAN baselines' 1 generator step per 5-10 KD steps, the two-stage recipe): it wins.
  from cmi_jax.synthesis import presets  # pylint: disable=g-import-not-at-top
  preset = presets.get(a['method'])
  for sec, values in (('synthesis', dict(g_steps=40, pool_size=8192)),
                      ('kd', dict(kd_steps=60, ep_steps=60, epochs=12))):
    for key, value in values.items():
      if key not in preset.get(sec, {}):
        c[sec][key] = value
  c.data.eval_batch_size = 1000
  c.log.every_kd_steps = 20
  if a['quick']:
    apply_quick(c)
  return c
