"""ImageNet's train transform on the host (cmi_jax.data.images): torchvision's
RandomResizedCrop box rule on fixed draws, against hand-worked boxes and an
independent vectorized numpy form of the rule; the decoded crop + resize + flip
against PIL; the per-step draws; and experiments/train_teacher.py's streamed batches."""


import numpy as np
import pytest
from PIL import Image

from cmi_jax import data
from cmi_jax.data import images
from experiments import train_teacher
from tests.helpers import fake_imagenet

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def _numpy_box(width, height, draws, scale, ratio):
  """The RandomResizedCrop rule, written independently: every try at once, the first
  accepted one chosen by argmax, else the centred fallback."""
  draws = np.asarray(draws, np.float64)
  target = width * height * (scale[0] + draws[:, 0] * (scale[1] - scale[0]))
  log_r = np.log(ratio[0]) + draws[:, 1] * (np.log(ratio[1]) - np.log(ratio[0]))
  w = np.rint(np.sqrt(target * np.exp(log_r))).astype(np.int64)
  h = np.rint(np.sqrt(target / np.exp(log_r))).astype(np.int64)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  if ok.any():
    t = int(np.argmax(ok))
    return (int(np.floor(draws[t, 2] * (height - h[t] + 1))),
            int(np.floor(draws[t, 3] * (width - w[t] + 1))), int(h[t]), int(w[t]))
  own = width / height
  if own < ratio[0]:    # too tall: full width, the tallest crop in range
    cw, ch = width, int(np.rint(width / ratio[0]))
  elif own > ratio[1]:  # too wide: full height
    cw, ch = int(np.rint(height * ratio[1])), height
  else:
    cw, ch = width, height
  return ((height - ch) // 2, (width - cw) // 2, ch, cw)


def _any_accepted(width, height, draws, scale, ratio):
  target = width * height * (scale[0] + draws[:, 0] * (scale[1] - scale[0]))
  aspect = np.exp(np.log(ratio[0]) + draws[:, 1] * (np.log(ratio[1]) - np.log(ratio[0])))
  w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
  return bool(np.any((w > 0) & (w <= width) & (h > 0) & (h <= height)))


def test_crop_box_by_hand():
  # 100 x 50. Try 1: the whole area at aspect 4/3: w = round(sqrt(5000 * 4/3)) = 82,
  # h = round(sqrt(3750)) = 61 > 50: rejected. Try 2: area 0.54 x 5000 = 2700 at aspect
  # 1: 52 x 52, h > 50: rejected. Try 3: area 0.08 x 5000 = 400 at aspect 1: 20 x 20;
  # top floor(0.5 x 31) = 15, left floor(0.999 x 81) = 80.
  draws = [[1.0 - 1e-12, 1.0 - 1e-12, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3], [0.0, 0.5, 0.5, 0.999]]
  draws += [[0.9, 0.5, 0.0, 0.0]] * 7
  assert images.resized_crop_box(100, 50, np.array(draws), SCALE, RATIO) == (15, 80, 20, 20)
  # Every try rejected (the whole area of a 10 x 100 image is 32 x 32): centre crop at the
  # nearest aspect ratio in range, 3/4: h = round(10 / 0.75) = 13, top (100 - 13) // 2.
  full = np.tile([1.0 - 1e-12, 0.5, 0.5, 0.5], (10, 1))
  assert images.resized_crop_box(10, 100, full, SCALE, RATIO) == (43, 0, 13, 10)
  assert images.resized_crop_box(100, 10, full, SCALE, RATIO) == (0, 43, 10, 13)
  # A square image whose tries all overshoot (aspect 4/3 at scale 1: 12 x 9): the whole image.
  over = np.tile([0.5, 1.0 - 1e-12, 0.5, 0.5], (10, 1))
  assert images.resized_crop_box(10, 10, over, (1.0, 1.0), RATIO) == (0, 0, 10, 10)
  with pytest.raises(ValueError, match=r'draws must be \[tries, 4\]'):
    images.resized_crop_box(10, 10, np.zeros((10, 3)), SCALE, RATIO)


def test_crop_box_matches_numpy_rule_on_random_draws():
  rng = np.random.default_rng(0)
  fallbacks = 0
  for trial in range(400):
    width, height = (int(v) for v in rng.integers(1, 400, 2))
    if trial % 4 == 0:
      width = max(1, height // 9)  # very narrow: the fallback is common
    scale = (0.08, 1.0) if trial % 3 else (0.25, 1.0)
    draws = rng.random((images.RRC_TRIES, images.RRC_DRAWS))
    got = images.resized_crop_box(width, height, draws, scale, RATIO)
    assert got == _numpy_box(width, height, draws, scale, RATIO), (width, height, draws)
    top, left, h, w = got
    assert 0 <= top <= height - h and 0 <= left <= width - w and h >= 1 and w >= 1
    fallbacks += not _any_accepted(width, height, draws, scale, RATIO)
  assert 10 < fallbacks < 200  # both branches exercised


def test_decode_train_is_crop_resize_flip(tmp_path):
  arr = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  path = str(tmp_path / 'a.png')
  Image.fromarray(arr).save(path)
  draws = np.random.default_rng(2).random((images.RRC_TRIES, images.RRC_DRAWS))
  top, left, h, w = _numpy_box(53, 37, draws, SCALE, RATIO)
  crop = Image.fromarray(arr[top:top + h, left:left + w]).resize((16, 16), Image.BILINEAR)
  want = np.asarray(crop)
  np.testing.assert_array_equal(images.decode_train(path, 16, draws, False, SCALE), want)
  np.testing.assert_array_equal(images.decode_train(path, 16, draws, True, SCALE),
                                want[:, ::-1])
  gray = images.decode_train(path, 16, draws, False, SCALE, channels=1)
  assert gray.shape == (16, 16, 1)


def test_train_draws_are_a_function_of_seed_and_step():
  a_crop, a_flip = images.train_draws(0, 5, 8)
  b_crop, b_flip = images.train_draws(0, 5, 8)
  assert a_crop.shape == (8, images.RRC_TRIES, images.RRC_DRAWS) and a_flip.dtype == bool
  np.testing.assert_array_equal(a_crop, b_crop)
  np.testing.assert_array_equal(a_flip, b_flip)
  assert not np.allclose(images.train_draws(0, 6, 8)[0], a_crop)
  assert not np.allclose(images.train_draws(1, 5, 8)[0], a_crop)
  flips = images.train_draws(3, 0, 4000)[1]
  assert 0.45 < flips.mean() < 0.55


def test_streamed_batches_decode_the_steps_images(tmp_path):
  root = fake_imagenet(tmp_path)
  info = data.get_info('imagenet', num_classes=3, image_size=16)
  split = data.load('imagenet', 'train', root, num_classes=3, image_size=16)
  assert train_teacher.streamed(split)
  order = np.random.default_rng(0).permutation(12)
  batches = train_teacher.StreamedBatches(split, info, seed=7, batch_size=4)
  batches.start(order, 1, 10, 2)  # batches 1 and 2 of the epoch, global steps 10 and 11
  for k in range(2):
    x, y = batches.next()
    idx = order[(1 + k) * 4:(2 + k) * 4]
    crops, flips = images.train_draws(7, 10 + k, 4)
    want = [images.decode_train(split.images.paths[j], 16, crops[i], flips[i], (0.08, 1.0))
            for i, j in enumerate(idx)]
    np.testing.assert_array_equal(x, np.stack(want))
    np.testing.assert_array_equal(y, split.labels[idx])
  assert batches.pending is None
  batches.close()
