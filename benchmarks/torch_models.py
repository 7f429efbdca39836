"""PyTorch rebuilds of the reference architectures (reference facts, section 1).

Plain torch modules with the reference code's structure and state_dict keys:
WideResNet (wrn_d_k), the CIFAR ResNets (resnet18/34), VGG-11 with BN, and the
CMI / GAN-baseline generators. Used by the conversion parity tests
(tests/test_convert.py) and the side-by-side PyTorch baseline
(benchmarks/torch_baseline.py). Needs the [torch] extra; torch is imported on
first use, so importing this module costs nothing without it.
"""

import functools


@functools.lru_cache(maxsize=None)
def reference_nets(inplace: bool = False):
  """(classifier(arch, num_classes, in_ch) -> nn.Module, Generator class).

  inplace: the WRN's ReLUs and the generator's LeakyReLUs in place (the reference
  code's `nn.ReLU(inplace=True)` / `nn.LeakyReLU(0.2, inplace=True)`): same values,
  fewer fresh activation buffers (`benchmarks/baseline_audit.py` measures the effect).
  """
  import torch  # pylint: disable=import-outside-toplevel
  tnn, functional = torch.nn, torch.nn.functional
  relu = functional.relu_ if inplace else functional.relu

  class WRNBlock(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = tnn.BatchNorm2d(cin)
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.convShortcut = None if cin == cout else tnn.Conv2d(cin, cout, 1, stride, 0,
                                                              bias=False)

    def forward(self, x):
      o = relu(self.bn1(x))
      out = self.conv2(relu(self.bn2(self.conv1(o))))
      return (x if self.convShortcut is None else self.convShortcut(o)) + out

  class NetworkBlock(tnn.Module):
    def __init__(self, n, cin, cout, stride):
      super().__init__()
      self.layer = tnn.Sequential(*[WRNBlock(cin if i == 0 else cout, cout,
                                             stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
      return self.layer(x)

  class WideResNet(tnn.Module):
    def __init__(self, depth, widen, num_classes, in_ch):
      super().__init__()
      n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
      self.conv1 = tnn.Conv2d(in_ch, w[0], 3, 1, 1, bias=False)
      self.block1 = NetworkBlock(n, w[0], w[1], 1)
      self.block2 = NetworkBlock(n, w[1], w[2], 2)
      self.block3 = NetworkBlock(n, w[2], w[3], 2)
      self.bn1 = tnn.BatchNorm2d(w[3])
      self.fc = tnn.Linear(w[3], num_classes)

    def forward(self, x):
      x = self.block3(self.block2(self.block1(self.conv1(x))))
      x = functional.adaptive_avg_pool2d(relu(self.bn1(x)), 1)
      return self.fc(x.flatten(1))

  class ResBlock(tnn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.shortcut = tnn.Sequential()
      if stride != 1 or cin != planes:
        self.shortcut = tnn.Sequential(tnn.Conv2d(cin, planes, 1, stride, bias=False),
                                       tnn.BatchNorm2d(planes))

    def forward(self, x):
      out = functional.relu(self.bn1(self.conv1(x)))
      return functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

  class ResNet(tnn.Module):
    def __init__(self, blocks, num_classes, in_ch):
      super().__init__()
      self.conv1 = tnn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      cin = 64
      for k, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
        layer = []
        for j in range(blocks[k]):
          layer.append(ResBlock(cin, planes, stride if j == 0 else 1))
          cin = planes
        setattr(self, f'layer{k + 1}', tnn.Sequential(*layer))
      self.linear = tnn.Linear(512, num_classes)

    def forward(self, x):
      x = functional.relu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.linear(functional.adaptive_avg_pool2d(x, 1).flatten(1))

  class VGG11(tnn.Module):
    def __init__(self, num_classes, in_ch):
      super().__init__()
      cin = in_ch
      for b, widths in enumerate(((64,), (128,), (256, 256), (512, 512), (512, 512))):
        layers = []
        for w in widths:
          layers += [tnn.Conv2d(cin, w, 3, padding=1), tnn.BatchNorm2d(w), tnn.ReLU()]
          cin = w
        setattr(self, f'block{b}', tnn.Sequential(*layers[:-1]))  # last ReLU in forward
      self.classifier = tnn.Linear(512, num_classes)

    def forward(self, x):
      h = x.shape[2]
      for b in range(5):
        x = functional.relu(getattr(self, f'block{b}')(x))
        if b < 3 or (b == 3 and h == 64):
          x = functional.max_pool2d(x, 2, 2)
      return self.classifier(functional.adaptive_avg_pool2d(x, 1).flatten(1))

  class Generator(tnn.Module):
    def __init__(self, nz, ngf, img_size, nc, large):
      super().__init__()
      self.s, self.width = img_size // 4, (4 if large else 2) * ngf
      w1 = self.width // 2 if large else self.width
      self.l1 = tnn.Sequential(tnn.Linear(nz, self.width * self.s ** 2))
      self.conv_blocks = tnn.Sequential(
          tnn.BatchNorm2d(self.width), tnn.Upsample(scale_factor=2),
          tnn.Conv2d(self.width, w1, 3, 1, 1, bias=False), tnn.BatchNorm2d(w1),
          tnn.LeakyReLU(0.2, inplace=inplace), tnn.Upsample(scale_factor=2),
          tnn.Conv2d(w1, w1 // 2, 3, 1, 1, bias=False), tnn.BatchNorm2d(w1 // 2),
          tnn.LeakyReLU(0.2, inplace=inplace), tnn.Conv2d(w1 // 2, nc, 3, 1, 1), tnn.Sigmoid())

    def forward(self, z):
      out = self.l1(z.reshape(z.shape[0], -1))
      return self.conv_blocks(out.reshape(z.shape[0], self.width, self.s, self.s))

  def classifier(arch, num_classes, in_ch):
    if arch.startswith('wrn'):
      _, depth, widen = arch.split('_')
      return WideResNet(int(depth), int(widen), num_classes, in_ch)
    if arch.startswith('resnet'):
      return ResNet({'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3)}[arch], num_classes,
                    in_ch)
    return VGG11(num_classes, in_ch)

  return classifier, Generator
