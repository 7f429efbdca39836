"""Plain PyTorch (eager) FastDFKD ImageNet round: the side-by-side baseline of 'fast_imagenet'.

Written from zoo-and-datasets.md section 5 (FD `fast_meta_imagenet.py`, the logged
Fast-50 runs, `is_maml 0`) to time what the authors' ImageNet synthesizer does, in
the same process as cmi_jax's `fast.fast_round` (benchmarks/synthesis_speed.py
--rows=imagenet). Needs the [torch] extra.

`DeepGenerator`: the authors' module and state_dict keys (`conv_blocks.0` ... `.19`,
plus the unused `l1` Linear, which no forward touches); `load_flax_generator` copies
cmi_jax's DeepGenerator variables into it, so both give the same images.

`FastImageNetSynthesizer.run_round(K)`, one round as the authors' code runs it:
  1. every z_life-th round (1-based) a fresh latent and, with meta_reset, a fresh meta-Adam;
  2. uniform random targets; a fast copy G' of the meta-generator and an inner Adam
     over {G' at lr_g, the persistent z at lr_z}, betas (0.5, 0.999) (z is trained in
     place, as the authors' `self.z.detach()` shares its storage);
  3. K steps: x = G'(z); x_aug = normalize(RandomResizedCrop(local_scale) + flip);
     L = bn * momentum L_bn (every teacher BN, forward hooks) + oh * CE + adv * masked
     KL against the eval-mode student; backward; inner Adam step;
  4. the BN EMA from the last forward; the Reptile meta step grad = theta - theta'_K
     with the persistent meta-Adam at lr_meta;
  5. the last iterate (the final forward's images) into the uint8 pool.
As cmi_jax's round: no best-iterate tracking, no loss.item(), the teacher's and
student's weight gradients not computed (torch_baseline's param_grads=False).
"""

import copy
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.torch_baseline import kl_per_sample, normalize, resized_crop_flip
from cmi_jax.synthesis.fast import meta_lr


class DeepGenerator(torch.nn.Module):
  """FD:datafree/models/generator.py DeepGenerator: z [B, nz, S/16, S/16] -> x [B, nc, S, S].

  `l1` (Linear nz -> ngf * (S/32)^2) is kept for the state_dict's sake only; its
  key `l1.0` follows the CIFAR generator's (the facts name the module `l1`).
  """

  def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 224, nc: int = 3):
    super().__init__()
    tnn = torch.nn
    self.l1 = tnn.Sequential(tnn.Linear(nz, ngf * max(img_size // 32, 1) ** 2))
    layers = [tnn.Conv2d(nz, 2 * ngf, 3, 1, 1, bias=False), tnn.BatchNorm2d(2 * ngf),
              tnn.LeakyReLU(0.2)]
    for cin, cout in ((2 * ngf, 2 * ngf), (2 * ngf, ngf), (ngf, ngf), (ngf, ngf)):
      layers += [tnn.Upsample(scale_factor=2, mode='nearest'),
                 tnn.Conv2d(cin, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout),
                 tnn.LeakyReLU(0.2)]
    layers += [tnn.Conv2d(ngf, nc, 3, 1, 1), tnn.Sigmoid()]  # index 19, 20
    self.conv_blocks = tnn.Sequential(*layers)

  def forward(self, z):
    return self.conv_blocks(z)

  def used_parameters(self) -> List[torch.nn.Parameter]:
    """What the forward touches (the optimizers' parameters; `l1` never gets a gradient)."""
    return list(self.conv_blocks.parameters())


def flax_generator_state_dict(variables) -> Dict[str, torch.Tensor]:
  """cmi_jax DeepGenerator {'params', 'batch_stats'} -> the authors' key names.

  block{i}.conv -> conv_blocks.{i}, block{i}.bn -> conv_blocks.{i+1}, conv19 ->
  conv_blocks.19 (cmi_jax's names already carry the authors' indices).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cmi_jax import convert  # pylint: disable=import-outside-toplevel
  out = {}
  for key, value in convert.flax_to_torch(variables).items():
    layer, *rest = key.split('.')
    if layer == 'conv19':
      name = f'conv_blocks.19.{rest[-1]}'
    elif layer.startswith('block') and rest[0] in ('conv', 'bn'):
      i = int(layer[len('block'):]) + (rest[0] == 'bn')
      name = f'conv_blocks.{i}.{rest[-1]}'
    else:
      raise KeyError(f'unexpected DeepGenerator variable {key!r}')
    out[name] = torch.from_numpy(np.array(value))
  return out


def load_flax_generator(gen: DeepGenerator, variables) -> DeepGenerator:
  """Copies cmi_jax's DeepGenerator variables into `gen` (every conv_blocks key must match)."""
  sd = gen.state_dict()
  new = flax_generator_state_dict(variables)
  for k, v in new.items():
    if k not in sd or sd[k].shape != v.shape:
      have = tuple(sd[k].shape) if k in sd else None
      raise KeyError(f'{k}: {tuple(v.shape)} does not fit the torch generator ({have})')
  missing = [k for k in sd if k.startswith('conv_blocks.') and 'num_batches' not in k
             and k not in new]
  if missing:
    raise KeyError(f'cmi_jax variables lack {missing}')
  sd.update(new)
  gen.load_state_dict(sd)
  return gen


class BatchStatHooks:
  """Forward hooks on every BN of a net: its input's batch mean and biased variance.

  torch_baseline.BNHooks computes the plain L_bn and the per-sample features in the
  hook; the momentum term needs the raw statistics (and no features), so this keeps
  only those.
  """

  def __init__(self, net: torch.nn.Module):
    self.bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    self.stats = [None] * len(self.bns)
    self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.bns)]

  def _hook(self, i):
    def hook(_, inputs, __):
      x = inputs[0]
      self.stats[i] = (x.mean([0, 2, 3]), x.var([0, 2, 3], unbiased=False))
    return hook

  def momentum_bn_loss(self, ema: Optional[List], m: float) -> torch.Tensor:
    """sum_l ||var_run - mix(var)||_2 + ||mu_run - mix(mu)||_2, mix = (1-m) batch + m EMA
    (m = 0 before the first EMA: the plain L_bn)."""
    total = 0.0
    for i, (bn, (mu, var)) in enumerate(zip(self.bns, self.stats)):
      if ema is not None:
        mu, var = (1 - m) * mu + m * ema[i][0], (1 - m) * var + m * ema[i][1]
      total = total + torch.norm(bn.running_var - var, 2) + torch.norm(bn.running_mean - mu, 2)
    return total

  def update_ema(self, ema: Optional[List], m: float) -> List:
    """ema <- m * ema + (1 - m) * last batch statistics (the first update copies them)."""
    now = [(mu.detach(), var.detach()) for mu, var in self.stats]
    if ema is None:
      return now
    return [(m * e_mu + (1 - m) * mu, m * e_var + (1 - m) * var)
            for (e_mu, e_var), (mu, var) in zip(ema, now)]


class FastImageNetSynthesizer:
  """The authors' Fast-K ImageNet synthesis loop on CPU, from a cmi_jax SynthesisConfig.

  augment: (x [B, C, H, W] in [0, 1], inner step) -> view, before normalization;
  default RandomResizedCrop(cfg.local_scale) + flip per sample (tests pass cmi_jax's warps).
  """

  def __init__(self, teacher, student, cfg, param_grads: bool = False,
               augment: Optional[Callable] = None, pool_size: Optional[int] = None):
    h, w, c = cfg.image_shape
    self.cfg = cfg
    self.teacher = teacher.eval()
    self.student = student.eval() if student is not None else None
    for net in (teacher, student):
      for p in (net.parameters() if net is not None else ()):
        p.requires_grad_(param_grads)
    self.hooks = BatchStatHooks(teacher)
    self.generator = DeepGenerator(cfg.nz, cfg.ngf, h, c).train()
    self.z = torch.randn((cfg.batch_size, cfg.nz, h // 16, w // 16), requires_grad=True)
    self.meta_opt = self._meta_adam()
    self.augment = augment or (lambda x, _: resized_crop_flip(x, cfg.local_scale))
    self.ema: Optional[List] = None
    self.round = 0
    self.pool = torch.zeros((pool_size or cfg.pool_size, c, h, w), dtype=torch.uint8)
    self.pool_ptr = 0
    self.rows: List[Dict[str, torch.Tensor]] = []  # the last round's unweighted terms per step

  def _meta_adam(self):
    return torch.optim.Adam(self.generator.used_parameters(), lr=meta_lr(self.cfg),
                            betas=tuple(self.cfg.betas))

  def run_round(self, g_steps: Optional[int] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One round of g_steps (default cfg.g_steps) inner steps; returns the pool's new images."""
    cfg, wts = self.cfg, self.cfg.weights
    k = g_steps or cfg.g_steps
    if (self.round + 1) % cfg.z_life == 0:  # cmi_jax's schedule: init drew the first z
      self.z = torch.randn_like(self.z).requires_grad_(True)
      if cfg.meta_reset:
        self.meta_opt = self._meta_adam()
    if targets is None:
      targets = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    fast = copy.deepcopy(self.generator)
    opt = torch.optim.Adam([{'params': fast.used_parameters(), 'lr': cfg.lr_g},
                            {'params': [self.z], 'lr': cfg.lr_z}], betas=tuple(cfg.betas))
    adv_on = float(self.round >= cfg.adv_start_round)
    m = cfg.bn_mmt
    self.rows = []
    for step in range(k):
      x = fast(self.z)
      xa = normalize(self.augment(x, step), cfg.mean, cfg.std)
      t_out = self.teacher(xa)
      terms = {}
      if wts.bn:
        terms['bn'] = self.hooks.momentum_bn_loss(self.ema, m)
      if wts.oh:
        terms['oh'] = F.cross_entropy(t_out, targets)
      if wts.adv and self.student is not None:
        s_out = self.student(xa)
        mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
        kl = kl_per_sample(s_out, t_out, cfg.adv_temperature)
        terms['adv'] = adv_on * -(kl * mask).mean()
      loss = sum(getattr(wts, n) * v for n, v in terms.items())
      opt.zero_grad()
      loss.backward()
      opt.step()
      self.rows.append({'loss': loss.detach(), **{f'l_{n}': v.detach() for n, v in terms.items()}})
    self.ema = self.hooks.update_ema(self.ema, m)
    # Reptile (is_maml 0): grad = theta - theta'_K, no scale, one meta-Adam step.
    self.meta_opt.zero_grad()
    for p, q in zip(self.generator.used_parameters(), fast.used_parameters()):
      p.grad = (p.detach() - q.detach()).clone()
    self.meta_opt.step()
    images = x.detach()
    n = images.shape[0]
    idx = (self.pool_ptr + torch.arange(n)) % self.pool.shape[0]
    self.pool[idx] = torch.round(images.clamp(0, 1) * 255).to(torch.uint8)
    self.pool_ptr = int((self.pool_ptr + n) % self.pool.shape[0])
    self.round += 1
    return images
