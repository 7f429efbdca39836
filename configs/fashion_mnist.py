"""CMI on Fashion-MNIST with the shipped teacher: the README's main command.

  python -m experiments.run --config=configs/fashion_mnist.py --workdir=runs/fmnist_cmi

Teacher: teachers/fashion_mnist_wrn_16_2 (trained by configs/teacher_fashion_mnist.py,
shipped in the repo); student: wrn_16_1 from scratch, data-free. Sized to finish in
about 10 minutes on a 2-core CPU (the README states the accuracy reached). Other
methods: `:method=deepinv` etc. (see cmi_jax/synthesis/presets.py); `:quick` is a
seconds-long smoke run. A baseline keeps its preset's own per-round schedule
(g_steps, kd_steps; DeepInversion and the two-stage recipe are hours on a CPU);
`:method=fast5` (and fast2, fast10) runs FastDFKD at CPU size (~8 minutes).

`:full` is the paper's CIFAR schedule on the same teacher, for a GPU:

  python -m experiments.run --config=configs/fashion_mnist.py:full --workdir=runs/fmnist_full

(one H200, jax 0.11.2: 92.65% best epoch, 51 of 60 epochs in 300 s while sharing the
GPU with a second run; teacher 93.77%; see the README's GPU section for the CPU time).
"""

from configs.common import apply_quick, base_config, keep_all_pool_size, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, _positional='method', method='cmi', quick=False, full=False)
  c = base_config('fashion_mnist', a['method'])
  c.teacher.arch, c.teacher.checkpoint = 'wrn_16_2', 'teachers/fashion_mnist_wrn_16_2'
  c.student.arch = 'wrn_16_1'
  s, k = c.synthesis, c.kd
  c.data.eval_batch_size = 1000
  if a['full']:
    # The paper's CIFAR schedule (base_config's values; reference-facts section 3):
    # batch 256, ngf 64, n_neg 4096, bank 40960, pool 51200, 200 generator steps and
    # 400 KD steps of batch 128 per round, one round per epoch; 60 epochs here.
    s.batch_size, s.ngf, s.n_neg, s.bank_size, s.pool_size = 256, 64, 4096, 40960, 51200
    k.batch_size, k.epochs = 128, 60
    schedule = dict(synthesis=dict(g_steps=200), kd=dict(kd_steps=400, ep_steps=400))
  else:
    # CPU-sized schedule: small rounds, few epochs; the loss weights stay the paper's.
    s.batch_size, s.ngf, s.n_neg, s.bank_size = 64, 32, 512, 8192
    k.batch_size = 64
    schedule = dict(synthesis=dict(g_steps=40, pool_size=8192),
                    kd=dict(kd_steps=60, ep_steps=60, epochs=12))
    c.log.every_kd_steps = 20
    c.log.checkpoint_every_rounds = 1  # ~1 min CPU rounds of a small state: save each
  # A preset's own schedule is part of its method (DeepInversion's 1000 pixel steps, the
  # GAN baselines' 1 generator step per 5-10 KD steps, the two-stage recipe): it wins.
  from cmi_jax.synthesis import presets  # pylint: disable=g-import-not-at-top
  preset = presets.get(a['method'])
  for sec, values in schedule.items():
    for key, value in values.items():
      if key not in preset.get(sec, {}):
        c[sec][key] = value
  if c.synthesis.algorithm == 'nayer' and not a['full']:
    # NAYER at CPU size with the authors' structure (a longer warm-up round, 2 loops per
    # epoch, periodic generator reset, every loop's images kept): batch 60 = 6 noisy
    # layers x 10 classes, 20 steps per loop, 2 warm-up rounds of 5 loops, 12 KD epochs
    # of 60 steps at batch 64, a fresh generator every 5 rounds.
    s.batch_size, s.g_steps, s.g_life = 60, 20, 5
    k.batch_size, k.kd_steps, k.ep_steps, k.epochs = 64, 60, 60, 12
    k.pre_rounds, k.pre_loops = 2, 5
    s.pool_size = keep_all_pool_size(c)
  if c.synthesis.algorithm == 'fast' and not a['full']:
    # FastDFKD at CPU size (benchmarks/time_to_accuracy.py): batch 64, 10 synthesis-only
    # warm-up rounds (L_adv from the 10th: derived from kd.pre_rounds), then 10 epochs of 5 rounds x 30 KD steps; the
    # pool keeps every image (64 x 60 rounds); no reset_l0 (a round-140 event).
    s.pool_size, s.reset_l0_round = 8192, -1
    k.batch_size, k.pre_rounds, k.kd_steps, k.ep_steps, k.epochs = 64, 10, 30, 150, 10
  if a['quick']:
    apply_quick(c)
  return c
