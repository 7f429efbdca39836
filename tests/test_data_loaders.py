"""The image-folder, Tiny-ImageNet, ImageNet, SVHN and resized-MNIST loaders, each on a
tiny fake copy of its real on-disk layout written here, and their bad-input errors."""

import os
import struct

import numpy as np
import pytest
from PIL import Image

from cmi_jax import data

WNIDS = ['n03', 'n01', 'n02']  # wnids.txt order; the class index is the sorted order


def _image(path, w, h, seed, mode='RGB'):
  """A small gradient + noise image, written in the format its extension names."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                   np.full_like(xx, 40 * (seed % 6))], -1)
  arr = np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)
  img = Image.fromarray(arr, 'RGB').convert(mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, format='JPEG' if path.lower().endswith(('.jpeg', '.jpg')) else 'PNG')
  return path


def _rgb(path):
  with Image.open(path) as img:
    return np.asarray(img.convert('RGB'))


def _write_tiny(root, per_class=2, n_val=4):
  """tiny-imagenet-200/: wnids.txt, train/<wnid>/images/*.JPEG (one grayscale),
  val/images/*.JPEG + val/val_annotations.txt (file, wnid, box)."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'wnids.txt'), 'w') as f:
    f.write('\n'.join(WNIDS) + '\n')
  for k, w in enumerate(WNIDS):
    for i in range(per_class):
      _image(os.path.join(root, 'train', w, 'images', f'{w}_{i}.JPEG'), 64, 64, 10 * k + i,
             mode='L' if (k, i) == (0, 1) else 'RGB')
    with open(os.path.join(root, 'train', w, f'{w}_boxes.txt'), 'w') as f:
      f.write('ignored\n')
  rows = []
  for i in range(n_val):
    name = f'val_{i}.JPEG'
    _image(os.path.join(root, 'val', 'images', name), 64, 64, 100 + i)
    rows.append(f'{name}\t{WNIDS[i % 3]}\t0\t0\t63\t63')
  with open(os.path.join(root, 'val', 'val_annotations.txt'), 'w') as f:
    f.write('\n'.join(rows) + '\n')
  return root


def _write_tree(root, splits=('train', 'val'), classes=('dog', 'cat'), per_class=2,
                size=(30, 26), ext='.png'):
  for s in splits:
    for k, c in enumerate(classes):
      for i in range(per_class):
        _image(os.path.join(root, s, c, f'{i}{ext}'), size[0], size[1], 7 * k + i + len(s))
  return root


# ---------------------------------------------------------------- tiny_imagenet

@pytest.mark.parametrize('depth', [0, 1, 2])
def test_tiny_imagenet_layout(tmp_path, depth):
  """data.dir holds wnids.txt, or tiny-imagenet-200/ (the archive), or
  tiny-imagenet-200/tiny-imagenet-200/ (NAYER's registry)."""
  root = _write_tiny(os.path.join(tmp_path, *['tiny-imagenet-200'] * depth))
  train = data.load('tiny_imagenet', 'train', str(tmp_path), num_classes=3)
  assert train.images.shape == (6, 64, 64, 3) and train.images.dtype == np.uint8
  order = sorted(WNIDS)
  np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
  first = os.path.join(root, 'train', order[0], 'images', f'{order[0]}_0.JPEG')
  np.testing.assert_array_equal(train.images[0], _rgb(first))
  gray = train.images[order.index('n03') * 2 + 1]  # the grayscale JPEG, converted to RGB
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  test = data.load('tiny_imagenet', 'test', str(tmp_path), num_classes=3)
  np.testing.assert_array_equal(test.labels, [order.index(WNIDS[i % 3]) for i in range(4)])
  np.testing.assert_array_equal(test.images[3], _rgb(os.path.join(root, 'val', 'images',
                                                                  'val_3.JPEG')))
  info = data.get_info('tiny_imagenet')
  assert info.mean == info.std == (0.5, 0.5, 0.5) and info.image_shape == (64, 64, 3)
  assert info.num_classes == 200 and (info.crop_padding, info.flip) == (4, True)


def test_tiny_imagenet_limit_spreads_over_classes(tmp_path):
  _write_tiny(str(tmp_path), per_class=4)
  got = data.load('tiny_imagenet', 'train', str(tmp_path), num_classes=3, limit=3)
  np.testing.assert_array_equal(got.labels, [0, 1, 2])


def test_tiny_imagenet_bad_input(tmp_path):
  root = _write_tiny(str(tmp_path / 'tiny-imagenet-200'))
  # The table's 200 classes against a wnids.txt of 3.
  with pytest.raises(data.DataCorruptError, match='defines 3 classes.*data.num_classes=3'):
    data.load('tiny_imagenet', 'test', str(tmp_path))
  # A label file naming a class wnids.txt lacks: the file, the line, the value, the fix.
  ann = os.path.join(root, 'val', 'val_annotations.txt')
  with open(ann, 'a') as f:
    f.write('val_0.JPEG\tn99\t0\t0\t1\t1\n')
  with pytest.raises(data.DataCorruptError) as e:
    data.load('tiny_imagenet', 'test', str(tmp_path), num_classes=3)
  assert ann in str(e.value) and 'line 5' in str(e.value) and "'n99'" in str(e.value)
  assert 're-extract' in str(e.value)
  os.remove(ann)
  with pytest.raises(data.DataNotFoundError, match='val_annotations.txt is missing'):
    data.load('tiny_imagenet', 'test', str(tmp_path), num_classes=3)
  # A class folder without images.
  empty = os.path.join(root, 'train', 'n02', 'images')
  for n in os.listdir(empty):
    os.remove(os.path.join(empty, n))
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('tiny_imagenet', 'train', str(tmp_path), num_classes=3)
  assert empty in str(e.value) and 'data.dir' in str(e.value)
  # No wnids.txt anywhere: every place looked in is named.
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('tiny_imagenet', 'train', str(tmp_path / 'elsewhere'), num_classes=3)
  assert 'no such folder' in str(e.value)
  os.remove(os.path.join(root, 'wnids.txt'))
  with pytest.raises(data.DataNotFoundError, match='No wnids.txt') as e:
    data.load('tiny_imagenet', 'train', str(tmp_path), num_classes=3)
  assert os.path.join(root, 'tiny-imagenet-200') in str(e.value)


def test_damaged_image_names_the_file(tmp_path):
  root = _write_tiny(str(tmp_path))
  bad = os.path.join(root, 'val', 'images', 'val_2.JPEG')
  with open(bad, 'r+b') as f:
    f.truncate(40)
  with pytest.raises(data.DataCorruptError) as e:
    data.load('tiny_imagenet', 'test', str(tmp_path), num_classes=3)
  assert bad in str(e.value) and 'Replace the file' in str(e.value)


# ---------------------------------------------------------------- imagenet

def test_imagenet_resize_256_center_crop_224_streamed(tmp_path):
  _write_tree(str(tmp_path / 'ILSVRC2012'), classes=('n02', 'n01'), size=(300, 260))
  test = data.load('imagenet', 'test', str(tmp_path), num_classes=2)
  assert isinstance(test.images, data.FolderImages)  # nothing decoded yet
  assert test.images.shape == (4, 224, 224, 3) and len(test.images) == 4
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1])  # sorted wnids: n01 first
  # Resize 256: the shorter side 260 -> 256, the longer int(256 * 300 / 260) = 295;
  # CenterCrop 224: top round(32 / 2) = 16, left round(71 / 2) = 36.
  path = os.path.join(tmp_path, 'ILSVRC2012', 'val', 'n01', '0.png')
  with Image.open(path) as img:
    want = np.asarray(img.convert('RGB').resize((295, 256), Image.BILINEAR)
                      .crop((36, 16, 260, 240)))
  view = test.images[1:3]
  assert isinstance(view, data.FolderImages) and view.shape[0] == 2
  batches = list(data.iter_batches(test, 3))
  assert [type(b.images) for b in batches] == [np.ndarray] * 2
  assert [len(b.labels) for b in batches] == [3, 1]
  np.testing.assert_array_equal(batches[0].images[0], want)
  np.testing.assert_array_equal(np.asarray(view)[1], test.images[2])
  np.testing.assert_array_equal(test.images[[0, 3]][1], batches[1].images[0])
  info = data.get_info('imagenet')
  assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
  small = data.get_info('imagenet', image_size=112)
  assert small.image_shape == (112, 112, 3) and small.eval_resize == 128


def test_imagenet_evaluation_decodes_batch_by_batch(tmp_path):
  """distill.evaluate (and its multi-host wrapper) take a FolderImages split."""
  from cmi_jax import distill  # pylint: disable=import-outside-toplevel
  _write_tree(str(tmp_path), classes=('n01', 'n02', 'n03'), size=(260, 256))
  test = data.load('imagenet', 'test', str(tmp_path), num_classes=3)
  seen = []

  def eval_fn(variables, images, labels, valid):
    del variables
    assert isinstance(images, np.ndarray) and images.shape == (4, 224, 224, 3)
    seen.append(int(valid.sum()))
    return np.sum((labels == 1) & valid), 0.0
  ev = distill.evaluate(eval_fn, {}, test.images, test.labels, batch_size=4)
  assert seen == [4, 2] and ev['accuracy'] == pytest.approx(100 / 3)
  assert distill.evaluate_on_hosts(eval_fn, {}, test.images, test.labels, 4)['accuracy'] == \
      pytest.approx(100 / 3)


def test_imagenet_limit_and_bad_input(tmp_path):
  _write_tree(str(tmp_path), classes=('n01', 'n02'), per_class=3, size=(256, 256))
  got = data.load('imagenet', 'train', str(tmp_path), num_classes=2, limit=2)
  np.testing.assert_array_equal(got.labels, [0, 1])
  with pytest.raises(data.DataCorruptError, match='defines 2 classes, but imagenet has 1000'):
    data.load('imagenet', 'test', str(tmp_path))
  # The raw ILSVRC2012 val archive: flat JPEGs, no wnid folders.
  flat = tmp_path / 'flat'
  _image(str(flat / 'val' / 'ILSVRC2012_val_00000001.JPEG'), 8, 8, 0)
  with pytest.raises(data.DataNotFoundError, match='holds 1 image files directly'):
    data.load('imagenet', 'test', str(flat), num_classes=2)
  # A missing split names the folder expected.
  os.rename(tmp_path / 'val', tmp_path / 'validation')
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('imagenet', 'test', str(tmp_path), num_classes=2)
  assert f'No test split in {tmp_path}' in str(e.value) and 'val/' in str(e.value)


# ---------------------------------------------------------------- image_folder

def test_image_folder(tmp_path):
  _write_tree(str(tmp_path), splits=('train', 'test'), classes=('b', 'a', 'c'), size=(20, 16))
  opts = dict(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
  info = data.get_info('image_folder', str(tmp_path), **opts)
  assert info.num_classes == 3 and info.image_shape == (16, 16, 3)
  assert info.mean == (0.5, 0.4, 0.3) and info.std == (0.2, 0.2, 0.2)
  test = data.load('image_folder', 'test', str(tmp_path), **opts)
  assert isinstance(test.images, np.ndarray) and test.images.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 2, 2])  # a, b, c
  with Image.open(tmp_path / 'test' / 'a' / '1.png') as img:  # 20x16: crop left = 2
    np.testing.assert_array_equal(test.images[1], np.asarray(img.convert('RGB'))[:, 2:18])
  # val/ serves as the test split too; the class order follows train/.
  os.rename(tmp_path / 'test', tmp_path / 'val')
  os.rename(tmp_path / 'val' / 'a', tmp_path / 'val' / 'skip')
  with pytest.raises(data.DataCorruptError, match=r"class folder\(s\) \['skip'\]"):
    data.load('image_folder', 'test', str(tmp_path), **opts)
  os.rename(tmp_path / 'val' / 'skip', tmp_path / 'val' / 'a')
  os.remove(tmp_path / 'val' / 'a' / '1.png')
  np.testing.assert_array_equal(
      data.load('image_folder', 'test', str(tmp_path), **opts).labels, [0, 1, 1, 2, 2])


def test_image_folder_bad_input(tmp_path):
  with pytest.raises(ValueError, match='data.image_size, data.mean, data.std'):
    data.get_info('image_folder', str(tmp_path))
  with pytest.raises(ValueError, match=r'data.std=\(0.5,\) is invalid.*3 channel'):
    data.get_info('image_folder', num_classes=2, image_size=8, mean=(0.5,) * 3, std=(0.5,))
  opts = dict(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
  with pytest.raises(data.DataNotFoundError, match='data.num_classes'):
    data.get_info('image_folder', str(tmp_path), **opts)
  _write_tree(str(tmp_path), splits=('train',), size=(8, 8))
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('image_folder', 'test', str(tmp_path), **opts)
  assert 'No test split' in str(e.value) and 'test or val/' in str(e.value)
  os.makedirs(tmp_path / 'train' / 'empty')
  (tmp_path / 'train' / 'empty' / 'notes.txt').write_text('not an image')
  with pytest.raises(data.DataCorruptError, match='defines 3 classes'):
    data.load('image_folder', 'train', str(tmp_path), num_classes=2, **opts)
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('image_folder', 'train', str(tmp_path), **opts)
  assert str(tmp_path / 'train' / 'empty') in str(e.value) and 'without image files' in str(e.value)


# ---------------------------------------------------------------- svhn

def _write_svhn(directory, n=5, seed=0):
  import scipy.io  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = {}
  for split in ('train', 'test'):
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [5]][:n], np.uint8)
    scipy.io.savemat(os.path.join(directory, f'{split}_32x32.mat'), {'X': x, 'y': y})
    out[split] = (x, y)
  return out


def test_svhn(tmp_path):
  written = _write_svhn(str(tmp_path))
  for split in ('train', 'test'):
    x, y = written[split]
    got = data.load('svhn', split, str(tmp_path))
    assert got.images.shape == (5, 32, 32, 3) and got.images.dtype == np.uint8
    np.testing.assert_array_equal(got.labels, [0, 1, 9, 0, 5])  # label 10 is the digit 0
    assert got.images[3, 4, 5, 2] == x[4, 5, 2, 3]
    np.testing.assert_array_equal(got.images, np.moveaxis(x, 3, 0))
  info = data.get_info('svhn')
  assert info.mean == info.std == (0.5, 0.5, 0.5) and (info.crop_padding, info.flip) == (0, False)


def test_svhn_bad_input(tmp_path):
  _write_svhn(str(tmp_path))
  path = tmp_path / 'test_32x32.mat'
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataCorruptError) as e:
    data.load('svhn', 'test', str(tmp_path))
  assert str(path) in str(e.value) and 'truncated' in str(e.value)
  os.remove(path)
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('svhn', 'test', str(tmp_path))
  assert 'test_32x32.mat' in str(e.value) and 'data.dir' in str(e.value)


# ---------------------------------------------------------------- mnist at 32

def test_mnist_resized_to_32(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28), np.uint8)
  raw = tmp_path / 'MNIST' / 'raw'  # torchvision's layout under its root
  os.makedirs(raw)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    with open(raw / f'{prefix}-images-idx3-ubyte', 'wb') as f:
      f.write(bytes([0, 0, 8, 3]) + struct.pack('>III', 3, 28, 28) + images.tobytes())
    with open(raw / f'{prefix}-labels-idx1-ubyte', 'wb') as f:
      f.write(bytes([0, 0, 8, 1]) + struct.pack('>I', 3) + bytes([7, 0, 3]))
  assert data.load('mnist', 'test', str(tmp_path)).images.shape == (3, 28, 28, 1)
  got = data.load('mnist', 'test', str(tmp_path), image_size=32)
  assert got.images.shape == (3, 32, 32, 1)
  np.testing.assert_array_equal(got.labels, [7, 0, 3])
  want = np.asarray(Image.fromarray(images[2]).resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(got.images[2, ..., 0], want)
  assert data.get_info('mnist', image_size=32).image_shape == (32, 32, 1)


def test_config_options():
  assert data.config_options({'name': 'x', 'dir': '', 'image_size': 32}) == {'image_size': 32}
  assert data.config_options({'name': 'x'}) == {}


def test_runner_selects_a_loader_by_data_name(tmp_path):
  """data.name, data.num_classes and data.eval_limit reach the loader through the runner."""
  from configs import common  # pylint: disable=import-outside-toplevel
  from experiments import runner  # pylint: disable=import-outside-toplevel
  _write_tiny(str(tmp_path / 'tiny-imagenet-200'), n_val=6)
  cfg = common.base_config('tiny_imagenet')
  cfg.teacher.checkpoint, cfg.teacher.arch, cfg.student.arch = 'random', 'wrn_16_1', 'wrn_16_1'
  cfg.data.dir, cfg.data.num_classes, cfg.data.eval_limit = str(tmp_path), 3, 3
  runner.validate(cfg)
  info = runner.dataset_info(cfg)
  assert info.num_classes == 3 and info.image_shape == (64, 64, 3)
  test = runner.load_test_split(cfg)
  assert test.images.shape == (3, 64, 64, 3)
  np.testing.assert_array_equal(test.labels, [2, 1, 0])  # val_0, val_2, val_4: n03, n02, n01
