"""PyTorch twins of the model zoo, written from zoo-and-datasets.md sections 1-2.

Plain torch modules with the reference structures and state_dict keys (the
DataFree classifiers, RepDistiller layouts and torchvision's ImageNet nets),
for the parity tests of tests/test_zoo.py and benchmarks/zoo_parity.py. torch is
imported on first use, so importing this module costs nothing without it.
"""

import functools

CALIBRATION_BATCH = 4  # random images whose statistics become the BN running stats
VAR_FLOOR = 1e-2


@functools.lru_cache(maxsize=None)
def zoo_nets():
  """build(arch, num_classes) -> torch nn.Module for every name of ZOO below."""
  import torch  # pylint: disable=import-outside-toplevel
  tnn, fn = torch.nn, torch.nn.functional

  def conv_bn(cin, cout, k, stride=1, groups=1):
    return [tnn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            tnn.BatchNorm2d(cout)]

  class Block(tnn.Module):
    """BasicBlock (bottleneck=False) or Bottleneck (stride on the 3x3), shortcut named
    `shortcut` (DAFL / cmi_jax CIFAR) or `downsample` (torchvision, RepDistiller)."""

    def __init__(self, cin, planes, stride, bottleneck, shortcut_name):
      super().__init__()
      self.bottleneck = bottleneck
      out = planes * (4 if bottleneck else 1)
      if bottleneck:
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, out, 1)
      else:
        self.conv1, self.bn1 = conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
      self.shortcut_name = shortcut_name
      if stride != 1 or cin != out:
        setattr(self, shortcut_name, tnn.Sequential(*conv_bn(cin, out, 1, stride)))

    def forward(self, x):
      out = fn.relu(self.bn1(self.conv1(x)))
      if self.bottleneck:
        out = fn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
      else:
        out = self.bn2(self.conv2(out))
      short = getattr(self, self.shortcut_name, None)
      return fn.relu(out + (x if short is None else short(x)))

  def stages(net, cin, widths, blocks, strides, bottleneck, shortcut_name):
    for k, (w, n, s) in enumerate(zip(widths, blocks, strides)):
      layer = []
      for j in range(n):
        layer.append(Block(cin, w, s if j == 0 else 1, bottleneck, shortcut_name))
        cin = w * (4 if bottleneck else 1)
      setattr(net, f'layer{k + 1}', tnn.Sequential(*layer))
    return len(widths)

  class ResNet(tnn.Module):
    """kind 'tiny' (RepDistiller: 3 stages, AvgPool2d(8), fc), 'cifar' (DAFL resnet50:
    3x3 stem, linear) or 'imagenet' (torchvision: 7x7/2 stem + max-pool, fc)."""

    def __init__(self, kind, widths, blocks, bottleneck, num_classes):
      super().__init__()
      self.kind = kind
      stem = widths[0] if kind == 'tiny' else 64
      k, s = (7, 2) if kind == 'imagenet' else (3, 1)
      self.conv1 = tnn.Conv2d(3, stem, k, s, k // 2, bias=False)
      self.bn1 = tnn.BatchNorm2d(stem)
      if kind == 'tiny':
        widths = widths[1:]
      strides = (1,) + (2,) * (len(widths) - 1)
      self.n = stages(self, stem, widths, blocks, strides, bottleneck,
                      'shortcut' if kind == 'cifar' else 'downsample')
      head = tnn.Linear(widths[-1] * (4 if bottleneck else 1), num_classes)
      setattr(self, 'linear' if kind == 'cifar' else 'fc', head)

    def forward(self, x):
      x = fn.relu(self.bn1(self.conv1(x)))
      if self.kind == 'imagenet':
        x = fn.max_pool2d(x, 3, 2, 1)
      for k in range(self.n):
        x = getattr(self, f'layer{k + 1}')(x)
      x = fn.avg_pool2d(x, 8) if self.kind == 'tiny' else fn.adaptive_avg_pool2d(x, 1)
      head = self.linear if self.kind == 'cifar' else self.fc
      return head(x.flatten(1))

  class VGG(tnn.Module):
    def __init__(self, cfg, num_classes):
      super().__init__()
      cin = 3
      for b, widths in enumerate(cfg):
        mods = []
        for w in widths:
          mods += [tnn.Conv2d(cin, w, 3, 1, 1), tnn.BatchNorm2d(w), tnn.ReLU(inplace=True)]
          cin = w
        setattr(self, f'block{b}', tnn.Sequential(*mods[:-1]))
      self.classifier = tnn.Linear(512, num_classes)

    def forward(self, x):
      size = x.shape[2]
      for b in range(5):
        x = fn.relu(getattr(self, f'block{b}')(x))
        if b < 3 or (b == 3 and size == 64):
          x = fn.max_pool2d(x, 2)
      return self.classifier(fn.adaptive_avg_pool2d(x, 1).flatten(1))

  def shuffle(x):
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)

  class ShuffleBasic(tnn.Module):
    def __init__(self, c):
      super().__init__()
      c //= 2
      self.conv1, self.bn1 = conv_bn(c, c, 1)
      self.conv2, self.bn2 = conv_bn(c, c, 3, 1, groups=c)
      self.conv3, self.bn3 = conv_bn(c, c, 1)

    def forward(self, x):
      c = x.shape[1] // 2
      out = fn.relu(self.bn1(self.conv1(x[:, c:])))
      out = fn.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
      return shuffle(torch.cat([x[:, :c], out], 1))

  class ShuffleDown(tnn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      mid = cout // 2
      self.conv1, self.bn1 = conv_bn(cin, cin, 3, 2, groups=cin)
      self.conv2, self.bn2 = conv_bn(cin, mid, 1)
      self.conv3, self.bn3 = conv_bn(cin, mid, 1)
      self.conv4, self.bn4 = conv_bn(mid, mid, 3, 2, groups=mid)
      self.conv5, self.bn5 = conv_bn(mid, mid, 1)

    def forward(self, x):
      left = fn.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
      right = self.bn4(self.conv4(fn.relu(self.bn3(self.conv3(x)))))
      right = fn.relu(self.bn5(self.conv5(right)))
      return shuffle(torch.cat([left, right], 1))

  class ShuffleNetV2(tnn.Module):
    def __init__(self, num_classes):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(3, 24, 1)
      cin = 24
      for k, (w, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
        setattr(self, f'layer{k + 1}',
                tnn.Sequential(ShuffleDown(cin, w), *[ShuffleBasic(w) for _ in range(n)]))
        cin = w
      self.conv2, self.bn2 = conv_bn(464, 1024, 1)
      self.linear = tnn.Linear(1024, num_classes)

    def forward(self, x):
      x = fn.relu(self.bn1(self.conv1(x)))
      x = self.layer3(self.layer2(self.layer1(x)))
      x = fn.relu(self.bn2(self.conv2(x)))
      return self.linear(fn.avg_pool2d(x, 4).flatten(1))

  def conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    return tnn.Sequential(*conv_bn(cin, cout, k, stride, groups), tnn.ReLU6(inplace=True))

  class Inverted(tnn.Module):
    def __init__(self, cin, cout, stride, t):
      super().__init__()
      hidden = int(round(cin * t))
      self.residual = stride == 1 and cin == cout
      mods = [conv_bn_relu6(cin, hidden, 1)] if t != 1 else []
      mods += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), *conv_bn(hidden, cout, 1)]
      self.conv = tnn.Sequential(*mods)

    def forward(self, x):
      return x + self.conv(x) if self.residual else self.conv(x)

  class MobileNetV2(tnn.Module):
    def __init__(self, num_classes):
      super().__init__()
      feats, cin = [conv_bn_relu6(3, 32, 3, 2)], 32
      for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for j in range(n):
          feats.append(Inverted(cin, c, s if j == 0 else 1, t))
          cin = c
      feats.append(conv_bn_relu6(320, 1280, 1))
      self.features = tnn.Sequential(*feats)
      self.classifier = tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(1280, num_classes))

    def forward(self, x):
      return self.classifier(fn.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

  narrow, wide = (16, 16, 32, 64), (32, 64, 128, 256)
  tiny = lambda depth, widths: lambda k: ResNet('tiny', widths, ((depth - 2) // 6,) * 3, False, k)
  table = {
      **{f'resnet{d}': tiny(d, narrow) for d in (8, 20, 32, 56, 110)},
      'resnet8x4': tiny(8, wide), 'resnet32x4': tiny(32, wide),
      'vgg8': lambda k: VGG(((64,), (128,), (256,), (512,), (512,)), k),
      'vgg13': lambda k: VGG(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), k),
      'shufflenetv2': ShuffleNetV2,
      'mobilenetv2': MobileNetV2,
      'mobilenetv2_imagenet': MobileNetV2,
      'resnet50': lambda k: ResNet('cifar', (64, 128, 256, 512), (3, 4, 6, 3), True, k),
      'resnet18_imagenet': lambda k: ResNet('imagenet', (64, 128, 256, 512), (2, 2, 2, 2),
                                            False, k),
      'resnet34_imagenet': lambda k: ResNet('imagenet', (64, 128, 256, 512), (3, 4, 6, 3),
                                            False, k),
      'resnet50_imagenet': lambda k: ResNet('imagenet', (64, 128, 256, 512), (3, 4, 6, 3),
                                            True, k),
  }

  def build(arch, num_classes):
    return table[arch](num_classes)
  return build


def randomize(net, seed, input_shape=None, images=None, head_gain=1.0, var_floor=VAR_FLOOR,
              calibration_batch=CALIBRATION_BATCH):
  """Random weights and BN statistics, so a swapped or mis-laid key cannot hide.

  With input_shape, the running statistics are first measured on a random batch
  (with `images` [N, C, H, W] in it), then jittered: with the default init and unit
  running stats the logits of a deep net barely depend on the input, and statistics
  measured on other images than the test batch let deep residual nets grow their
  logits into the hundreds. Linear weights have variance head_gain / fan_in (1: logits
  of order 1). var_floor: a channel that was constant on the batch (ReLU6-saturated,
  or 1x1 maps deep in mobilenetv2 at 32x32) would divide float32 noise by sqrt(eps)
  in both frameworks. Also used by tests/test_convert.py (its own settings).
  """
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for mod in net.modules():
      if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
        fan_in = mod.weight[0].numel()
        gain = 2.0 if isinstance(mod, torch.nn.Conv2d) else head_gain
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (gain / fan_in) ** 0.5)
        if mod.bias is not None:
          mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
    for mod in bns:
      mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
      mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
    if input_shape is not None:
      for mod in bns:
        mod.reset_running_stats()
        mod.momentum = None  # cumulative: the statistics of the one calibration batch
      h, w, c = input_shape
      batch = torch.randn((calibration_batch, c, h, w), generator=gen)
      net.train()(batch if images is None else torch.cat([images, batch]))
    for mod in bns:
      mod.momentum = 0.1  # torch's default
      mod.running_mean.add_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
      mod.running_var.mul_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
      mod.running_var.clamp_(min=var_floor)
      mod.num_batches_tracked.fill_(seed)
  return net.eval()


def parity(arch, path, input_shape=(32, 32, 3), num_classes=10, batch=2, seed=0,
           layout='reference', fp64=False):
  """Saves a randomized torch twin of `arch` to `path`, loads it with cmi_jax.convert,
  and compares eval-mode logits on one random batch.

  layout: 'reference' ({'state_dict': ...}, zip), 'torchvision' (a raw state_dict, zip)
  or 'legacy' (a raw state_dict in torch's pre-1.6 format, as torchvision's 2017-18
  ImageNet weights are).
  Returns {'max_abs_diff', 'max_abs_logit', 'logit_spread' (mean over classes of the
  std over inputs)},
  with fp64=True also both float32 forwards' distance from torch in float64, and that of
  cmi_jax's forward in float64 (jax_fp64_logits).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from cmi_jax import convert  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  x = np.random.default_rng(seed + 2).normal(size=(batch, *input_shape)).astype(np.float32)
  x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
  net = randomize(zoo_nets()(arch, num_classes), seed + 1, input_shape, x_nchw)
  sd = net.state_dict()
  if layout == 'reference':
    torch.save({'state_dict': sd, 'best_acc': 0.5}, path)
  else:
    torch.save(sd, path, _use_new_zipfile_serialization=layout != 'legacy')
  module, variables = convert.load_pth(path, arch, num_classes, input_shape)
  with torch.no_grad():
    expected = net(x_nchw).numpy()
    exact = net.double()(x_nchw.double()).numpy() if fp64 else None
  logits = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
  out = {'max_abs_diff': float(np.max(np.abs(logits - expected))),
         'max_abs_logit': float(np.max(np.abs(expected))),
         'logit_spread': float(np.mean(np.std(expected, axis=0)))}
  if fp64:  # how far each float32 forward is from a float64 one: the floor of the comparison
    out['jax_vs_torch_fp64'] = float(np.max(np.abs(logits - exact)))
    out['torch_fp32_vs_fp64'] = float(np.max(np.abs(expected - exact)))
    out['jax_fp64_vs_torch_fp64'] = float(np.max(np.abs(jax_fp64_logits(module, variables, x)
                                                        - exact)))
  return out


def jax_fp64_logits(module, variables, x):
  """The cmi_jax forward (eval mode) with every op in float64 (x64 mode, just for this call).

  cmi_jax's BatchNorm computes in float32 by design, so for this measurement its eval
  form runs in float64 through flax's method interception: (x - running mean) *
  scale / sqrt(running var + eps) + bias, the module's own variables and eps. The zoo's
  final cast of the logits to float32 remains: a relative error of at most 2^-24 (6e-8).
  Agreement with torch in float64 to that level means both compute the same function,
  so their float32 differences are rounding.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cmi_jax.models import layers  # pylint: disable=import-outside-toplevel

  def bn64(next_fun, args, kwargs, ctx):
    if not isinstance(ctx.module, layers.BatchNorm) or ctx.method_name != '__call__':
      return next_fun(*args, **kwargs)
    p, s = ctx.module.variables['params'], ctx.module.variables['batch_stats']
    return (args[0] - s['mean']) * (p['scale'] / jnp.sqrt(s['var'] + ctx.module.epsilon)) + p['bias']

  was = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), variables)
    with nn.intercept_methods(bn64):
      out = module.apply(v64, jnp.asarray(np.asarray(x, np.float64)), train=False)
    return np.asarray(out, np.float64)
  finally:
    jax.config.update('jax_enable_x64', was)
