"""Plain PyTorch (eager) CMI iteration and KD step: the side-by-side baseline.

Written from the reference facts (section 2), on the PyTorch rebuilds of the
reference architectures (benchmarks/torch_models.py), to time what the
reference code does on the same machine, in the same process as cmi_jax
(benchmarks/synthesis_speed.py). Needs the [torch] extra.

One CMI iteration, as the reference runs it:
  x = G(z); global view (random crop with padding + flip + normalize) and local
  view (random resized crop + flip + normalize), each sample with its own
  parameters (an affine grid + grid_sample per batch, as kornia does); the
  teacher (eval) on the global view, forward hooks on every BN collecting the
  input's batch mean / biased variance (L_bn) and per-sample spatial means (the
  contrastive features); the student (eval) on the global view for L_adv; a
  second teacher call on the local view for the local features; the MLP head on
  [local, bank_local, global, bank_global]; the contrastive CE against n_neg
  bank negatives; loss.item() for the lowest-loss bookkeeping; backward and one
  Adam step on (generator, z) and one on the head.
The teacher's and the student's weight gradients are not computed
(`param_grads=False`, the default): with them this baseline took 3.13 s per
iteration (32x32x3, B=64) where the authors' own CMISynthesizer took 2.65 s on the
same machine (measured outside the repo, 2026-12-01); without them 2.59 s
(`benchmarks/baseline_audit.py`, 2026-12-02), i.e. at least as fast as the
reference, so cmi_jax's ratios do not flatter it. `param_grads=True` keeps the
older, slower baseline for comparison.

One KD step: a batch from the image pool, crop + flip + normalize (with
`crop_scale`: RandomResizedCrop(scale) + flip at the pool images' size instead, the
ImageNet recipe), teacher logits without gradient, the student in train mode,
KL(t/T || s/T) * T^2 at T=20, SGD (momentum 0.9, weight decay 1e-4).
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks.torch_models import reference_nets


REFERENCE_ARCHS = ('resnet18', 'resnet34', 'vgg11')  # + every wrn_d_k: benchmarks/torch_models


def build_classifier(arch: str, num_classes: int, in_ch: int,
                     inplace: bool = False) -> torch.nn.Module:
  """The reference rebuild of `arch`: benchmarks/torch_models for the WRNs, resnet18/34
  and vgg11, else the model zoo's torch twin (tests/torch_zoo.py; 3 input channels)."""
  if arch.startswith('wrn') or arch in REFERENCE_ARCHS:
    classifier, _ = reference_nets(inplace)
    return classifier(arch, num_classes, in_ch)
  from tests.torch_zoo import zoo_nets  # pylint: disable=import-outside-toplevel
  if in_ch != 3:
    raise ValueError(f'The torch twin of {arch} takes 3 input channels, got {in_ch}.')
  return zoo_nets()(arch, num_classes)


def normalize(x, mean, std):
  m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
  s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
  return (x - m) / s


def _warp(x: torch.Tensor, scale_y, scale_x, shift_y, shift_x) -> torch.Tensor:
  """Per-sample axis-aligned affine resampling (normalized coordinates):
  in = scale * out + shift, bilinear, zeros outside (kornia's warp_affine)."""
  n = x.shape[0]
  theta = torch.zeros((n, 2, 3), dtype=x.dtype)
  theta[:, 0, 0], theta[:, 0, 2] = scale_x, shift_x
  theta[:, 1, 1], theta[:, 1, 2] = scale_y, shift_y
  grid = F.affine_grid(theta, list(x.shape), align_corners=False)
  return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def crop_flip(x: torch.Tensor, padding: int) -> torch.Tensor:
  """RandomCrop(size, padding) + RandomHorizontalFlip, per sample."""
  n, _, h, w = x.shape
  oy = torch.randint(-padding, padding + 1, (n,)).to(x.dtype)
  ox = torch.randint(-padding, padding + 1, (n,)).to(x.dtype)
  flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).to(x.dtype)
  return _warp(x, torch.ones(n, dtype=x.dtype), flip, 2 * oy / h, 2 * ox / w)


def resized_crop_flip(x: torch.Tensor, scale: Sequence[float] = (0.25, 1.0),
                      ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
  """RandomResizedCrop(size, scale) + RandomHorizontalFlip, per sample."""
  n, _, h, w = x.shape
  area = torch.empty(n).uniform_(*scale) * h * w
  r = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1])))
  cw = torch.sqrt(area * r).round().clamp(1, w)
  ch = torch.sqrt(area / r).round().clamp(1, h)
  top = torch.floor(torch.rand(n) * (h - ch + 1))
  left = torch.floor(torch.rand(n) * (w - cw + 1))
  flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
  return _warp(x, ch / h, flip * cw / w, 2 * top / h + ch / h - 1, 2 * left / w + cw / w - 1)


class BNHooks:
  """Forward hooks on every BN of a net: L_bn term and per-sample input means.

  feature_modules: modules whose inputs' per-sample means are the contrastive features
  instead of every BN input's (the reference's choice for resnet34: layer1..layer4).
  """

  def __init__(self, net: torch.nn.Module, feature_modules=None):
    self.bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    self.r_feature = [None] * len(self.bns)
    self.instance_mean = [None] * len(self.bns)
    self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.bns)]
    self.feature_modules = feature_modules
    if feature_modules is not None:
      self.module_mean = [None] * len(feature_modules)
      self.handles += [m.register_forward_pre_hook(self._pre_hook(i))
                       for i, m in enumerate(feature_modules)]

  def _pre_hook(self, i):
    def hook(_, inputs):
      self.module_mean[i] = inputs[0].mean([2, 3])
    return hook

  def _hook(self, i):
    def hook(module, inputs, _):
      x = inputs[0]
      nch = x.shape[1]
      mean = x.mean([0, 2, 3])
      var = x.permute(1, 0, 2, 3).contiguous().view(nch, -1).var(1, unbiased=False)
      self.r_feature[i] = (torch.norm(module.running_var - var, 2)
                           + torch.norm(module.running_mean - mean, 2))
      self.instance_mean[i] = x.mean([2, 3])
    return hook

  def bn_loss(self):
    return sum(self.r_feature)

  def features(self):
    return torch.cat(self.instance_mean if self.feature_modules is None else self.module_mean,
                     dim=1)


def kl_per_sample(s_logits, t_logits, temperature):
  return F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                  reduction='none').sum(1)


class CMISynthesizer:
  """The reference CMI synthesis loop on CPU: `run_round(g_steps)`."""

  def __init__(self, teacher, student, image_shape, num_classes, mean, std, batch_size=256,
               nz=256, ngf=64, n_neg=4096, bank_size=40960, head_dim=256, lr_g=1e-3,
               betas=(0.5, 0.999), weights=(1.0, 1.0, 0.5, 0.8), cr_temperature=0.1,
               global_padding=4, local_scale=(0.25, 1.0), param_grads=False, inplace=False,
               feature_layers=None):
    """feature_layers: names of teacher modules whose inputs are the contrastive features
    (e.g. ('layer1', ..., 'layer4')); None: every BN input (the reference's default)."""
    h, w, c = image_shape
    _, generator = reference_nets(inplace)
    self.teacher, self.student = teacher.eval(), student.eval()
    for p in list(teacher.parameters()) + list(student.parameters()):
      p.requires_grad_(param_grads)
    self.generator = generator(nz, ngf, h, c, False)
    named = dict(teacher.named_modules())
    self.hooks = BNHooks(teacher, None if feature_layers is None
                         else [named[n] for n in feature_layers])
    self.image_shape, self.num_classes = image_shape, num_classes
    self.mean, self.std, self.b, self.nz = mean, std, batch_size, nz
    self.n_neg, self.lr_g, self.betas = n_neg, lr_g, betas
    self.bn_w, self.oh_w, self.adv_w, self.cr_w = weights
    self.cr_t, self.padding, self.local_scale = cr_temperature, global_padding, local_scale
    if feature_layers is None:
      d = sum(m.num_features for m in self.hooks.bns)
    else:
      with torch.no_grad():
        teacher(torch.zeros((1, c, h, w)))
      d = self.hooks.features().shape[1]
    self.head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(),
                                    torch.nn.Linear(d, head_dim))
    self.opt_head = torch.optim.Adam(self.head.parameters(), lr=lr_g)
    self.bank = torch.zeros((bank_size, 2 * d))
    self.bank_filled, self.bank_ptr = 0, 0

  def fill_bank(self, n: int) -> None:
    """Random features in the bank, so every iteration draws all n_neg negatives."""
    self.add_to_bank(torch.randn((n, self.bank.shape[1])))

  def add_to_bank(self, feats: torch.Tensor) -> None:
    n = feats.shape[0]
    idx = (self.bank_ptr + torch.arange(n)) % self.bank.shape[0]
    self.bank[idx] = feats
    self.bank_ptr = int((self.bank_ptr + n) % self.bank.shape[0])
    self.bank_filled = min(self.bank_filled + n, self.bank.shape[0])

  def _reset_generator(self):
    with torch.no_grad():
      for m in self.generator.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
          torch.nn.init.normal_(m.weight, 0.0, 0.02)
          if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
          torch.nn.init.normal_(m.weight, 1.0, 0.02)
          torch.nn.init.zeros_(m.bias)

  def run_round(self, g_steps: int) -> torch.Tensor:
    """One synthesis round; returns the lowest-loss images (the pool's new batch)."""
    self._reset_generator()
    self.generator.train()
    z = torch.randn((self.b, self.nz), requires_grad=True)
    targets = torch.sort(torch.randint(0, self.num_classes, (self.b,)))[0]
    opt = torch.optim.Adam([{'params': self.generator.parameters()}, {'params': [z]}],
                           lr=self.lr_g, betas=self.betas)
    best_cost, best_x, best_feats = math.inf, None, None
    for _ in range(g_steps):
      x = self.generator(z)
      xg = normalize(crop_flip(x, self.padding), self.mean, self.std)
      xl = normalize(resized_crop_flip(x, self.local_scale), self.mean, self.std)
      t_out = self.teacher(xg)
      loss_bn = self.hooks.bn_loss()
      loss_oh = F.cross_entropy(t_out, targets)
      s_out = self.student(xg)
      mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
      loss_adv = -(kl_per_sample(s_out, t_out, 1.0) * mask).mean()
      loss_inv = self.bn_w * loss_bn + self.oh_w * loss_oh + self.adv_w * loss_adv
      feat_g = self.hooks.features()
      self.teacher(xl)
      feat_l = self.hooks.features()
      if self.bank_filled:
        idx = torch.randperm(self.bank_filled)[:self.n_neg]
        bank_l, bank_g = torch.chunk(self.bank[idx], 2, dim=1)
        feats = torch.cat([feat_l, bank_l, feat_g, bank_g], dim=0)
      else:
        feats = torch.cat([feat_l, feat_g], dim=0)
      proj = F.normalize(self.head(feats), dim=1)
      p_l, p_g = torch.chunk(proj, 2, dim=0)
      cr_logits = p_l @ p_g.detach().T / self.cr_t
      ce = F.cross_entropy(cr_logits, torch.arange(cr_logits.shape[0]), reduction='none')
      loss_cr = ce[:self.b].mean() + ce[self.b:].mean() if self.bank_filled else ce.mean()
      loss = self.cr_w * loss_cr + loss_inv
      with torch.no_grad():
        if loss.item() < best_cost:
          best_cost, best_x = loss.item(), x.detach()
          best_feats = torch.cat([feat_l.detach(), feat_g.detach()], dim=1)
      opt.zero_grad()
      self.opt_head.zero_grad()
      loss.backward()
      opt.step()
      self.opt_head.step()
    self.add_to_bank(best_feats)
    return best_x


class KDTrainer:
  """The reference KD loop on pool images: `run(steps)`.

  crop_scale: None (default) the padded crop; (lo, hi) RandomResizedCrop(scale=(lo, hi))
  + flip (cmi_jax's KDConfig.crop_scale; ImageNet's train transform).
  """

  def __init__(self, teacher, student, pool: torch.Tensor, mean, std, batch_size=128,
               temperature=20.0, padding=4, lr=0.1, momentum=0.9, weight_decay=1e-4,
               crop_scale: Optional[Sequence[float]] = None):
    self.teacher, self.student = teacher.eval(), student
    self.pool, self.mean, self.std = pool, mean, std
    self.b, self.t, self.padding = batch_size, temperature, padding
    self.crop_scale = tuple(crop_scale) if crop_scale else None
    for p in student.parameters():
      p.requires_grad_(True)
    self.opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)

  def view(self, images: torch.Tensor) -> torch.Tensor:
    """uint8 pool images [B, C, H, W] -> the augmented, normalized KD input."""
    x = images.float() / 255.0
    x = (resized_crop_flip(x, self.crop_scale) if self.crop_scale
         else crop_flip(x, self.padding))
    return normalize(x, self.mean, self.std)

  def run(self, steps: int) -> float:
    self.student.train()
    loss = None
    for _ in range(steps):
      idx = torch.randint(0, self.pool.shape[0], (self.b,))
      x = self.view(self.pool[idx])
      with torch.no_grad():
        t_out = self.teacher(x)
      s_out = self.student(x.detach())
      loss = kl_per_sample(s_out, t_out, self.t).mean() * self.t ** 2
      self.opt.zero_grad()
      loss.backward()
      self.opt.step()
    return float(loss.detach())
