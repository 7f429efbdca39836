"""CMI on Fashion-MNIST with the shipped teacher: the README's main command.

  python -m experiments.run --config=configs/fashion_mnist.py --workdir=runs/fmnist_cmi

Teacher: teachers/fashion_mnist_wrn_16_2 (trained by configs/teacher_fashion_mnist.py,
shipped in the repo); student: wrn_16_1 from scratch, data-free. Sized to finish in
about 10 minutes on a 2-core CPU (the README states the accuracy reached). Other
methods: `:method=deepinv` etc. (see cmi_jax/synthesis/presets.py); `:quick` is a
seconds-long smoke run.
"""

from configs.common import apply_quick, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, _positional='method', method='cmi', quick=False)
  c = base_config('fashion_mnist', a['method'])
  c.teacher.arch, c.teacher.checkpoint = 'wrn_16_2', 'teachers/fashion_mnist_wrn_16_2'
  c.student.arch = 'wrn_16_1'
  s, k = c.synthesis, c.kd
  # CPU-sized schedule: small rounds, few epochs; the loss weights stay the paper's.
  s.batch_size, s.g_steps, s.ngf = 64, 40, 32
  s.n_neg, s.bank_size, s.pool_size = 512, 8192, 8192
  k.batch_size, k.kd_steps, k.ep_steps, k.epochs = 64, 60, 60, 12
  c.data.eval_batch_size = 1000
  c.log.every_kd_steps = 20
  if a['quick']:
    apply_quick(c)
  return c
