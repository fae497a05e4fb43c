"""Dataset loaders: IDX, CIFAR python batches (safe unpickling), npz, image folders, tfds, names."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from lbyl_jax.io import data
from lbyl_jax.io import download


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  for var in ('LBYL_JAX_DATA', 'LBYL_JAX_CACHE', 'XDG_CACHE_HOME'):
    monkeypatch.delenv(var, raising=False)
  return home


def _all(ds: data.Dataset, batch_size: int = 7) -> tuple[np.ndarray, np.ndarray]:
  parts = list(ds.batches(batch_size))
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------------------------
# IDX


def _idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
  return bytes([0, 0, code, a.ndim]) + struct.pack(f'>{a.ndim}I', *a.shape) + a.tobytes()


@pytest.mark.realdata
def test_real_fashion_mnist_idx(shared):
  ref = np.load(shared / 'data' / 'fashion_mnist_test.npz')
  idx_dir = shared / 'data' / 'fashion-mnist'
  for f in data.SOURCES['fashion_mnist']:  # the official md5 sums match the real files
    assert download.md5_file(idx_dir / pathlib.Path(f.filename).name) == f.md5
  for spec in (idx_dir, idx_dir / 't10k-images-idx3-ubyte.gz'):
    ds = data.load_dataset(str(spec), arch='lenet_300_100')
    assert len(ds) == 10000 and ds.image_shape == (28, 28, 1) and ds.name == 'fashion_mnist'
    np.testing.assert_array_equal(ds.images[..., 0], ref['images'])
    np.testing.assert_array_equal(ds.labels, ref['labels'])
    assert ds.labels.dtype == np.int32
  raw = data.read_idx(idx_dir / 't10k-labels-idx1-ubyte.gz')
  assert raw.shape == (10000,) and raw.dtype == np.uint8


def test_idx_dtypes_and_plain_files(tmp_path):
  a = np.arange(-30, 30, dtype='>i4').reshape(5, 4, 3)
  (tmp_path / 'a.idx').write_bytes(_idx_bytes(a, 0x0C))
  out = data.read_idx(tmp_path / 'a.idx')
  assert out.dtype == np.int32 and out.dtype.isnative
  np.testing.assert_array_equal(out, a)
  f = np.linspace(0, 1, 6, dtype='>f8')
  (tmp_path / 'f.idx.gz').write_bytes(gzip.compress(_idx_bytes(f, 0x0E)))
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'f.idx.gz'), f)


def _write_idx_pair(d: pathlib.Path, n_img: int, n_lab: int, *, gz: bool) -> np.ndarray:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n_img, 6, 5), dtype=np.uint8)
  labels = rng.integers(0, 10, n_lab, dtype=np.uint8)
  d.mkdir(parents=True, exist_ok=True)
  enc = gzip.compress if gz else (lambda b: b)
  sfx = '.gz' if gz else ''
  (d / f't10k-images-idx3-ubyte{sfx}').write_bytes(enc(_idx_bytes(images)))
  (d / f't10k-labels-idx1-ubyte{sfx}').write_bytes(enc(_idx_bytes(labels)))
  return images, labels


@pytest.mark.parametrize('gz', [False, True])
def test_idx_dir_round_trip(tmp_path, gz):
  images, labels = _write_idx_pair(tmp_path / 'mnist', 9, 9, gz=gz)
  ds = data.load_dataset(str(tmp_path / 'mnist'))
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, labels)
  sfx = '.gz' if gz else ''
  ds2 = data.load_dataset(str(tmp_path / 'mnist' / f't10k-images-idx3-ubyte{sfx}'))
  np.testing.assert_array_equal(ds2.images, ds.images)


def test_idx_errors(tmp_path):
  _write_idx_pair(tmp_path / 'count', 9, 8, gz=True)
  with pytest.raises(ValueError, match='9 images but .* 8 labels'):
    data.load_dataset(str(tmp_path / 'count'))

  images = np.zeros((4, 3, 3), np.uint8)
  bad = tmp_path / 'bad_magic-images-idx3-ubyte'
  bad.write_bytes(b'\x01\x00\x08\x03' + _idx_bytes(images)[4:])
  with pytest.raises(ValueError, match='magic'):
    data.read_idx(bad)
  short = tmp_path / 'short'
  short.write_bytes(_idx_bytes(images)[:-1])
  with pytest.raises(ValueError, match=r'dims \(4, 3, 3\)'):
    data.read_idx(short)
  long = tmp_path / 'long'
  long.write_bytes(_idx_bytes(images) + b'\0')
  with pytest.raises(ValueError, match='36 data bytes'):
    data.read_idx(long)
  head = tmp_path / 'head'
  head.write_bytes(b'\0\0\x08\x03\0\0')
  with pytest.raises(ValueError, match='truncated'):
    data.read_idx(head)

  d = tmp_path / 'wrongtype'
  d.mkdir()
  (d / 't10k-images-idx3-ubyte').write_bytes(_idx_bytes(np.zeros((2, 3, 3), '>i4'), 0x0C))
  (d / 't10k-labels-idx1-ubyte').write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
  with pytest.raises(ValueError, match='uint8'):
    data.load_dataset(str(d))
  lone = tmp_path / 'lone' / 't10k-images-idx3-ubyte'
  lone.parent.mkdir()
  lone.write_bytes(_idx_bytes(images))
  with pytest.raises(ValueError, match='labels file'):
    data.load_dataset(str(lone))


# --------------------------------------------------------------------------------------------
# CIFAR python batches


def _cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, 10, n)]
  d = {b'batch_label': b'testing batch 1 of 1', b'labels': labels, b'data': flat,
       b'filenames': [f'img_{i}.png'.encode() for i in range(n)]}
  return d, flat, np.asarray(labels)


def _write_cifar(root: pathlib.Path, protocol: int) -> tuple[np.ndarray, np.ndarray]:
  batches = root / 'cifar-10-batches-py'
  batches.mkdir(parents=True)
  d, flat, labels = _cifar_batch(13, 0)
  (batches / 'test_batch').write_bytes(pickle.dumps(d, protocol=protocol))
  (batches / 'data_batch_1').write_bytes(pickle.dumps(_cifar_batch(5, 1)[0], protocol=protocol))
  with tarfile.open(root / 'cifar-10-python.tar.gz', 'w:gz') as tar:
    tar.add(batches / 'data_batch_1', 'cifar-10-batches-py/data_batch_1')
    tar.add(batches / 'test_batch', 'cifar-10-batches-py/test_batch')
  return flat, labels


@pytest.mark.parametrize('protocol', [2, 5])
def test_cifar_batches_round_trip(tmp_path, protocol):
  flat, labels = _write_cifar(tmp_path, protocol)
  specs = [tmp_path / 'cifar-10-batches-py', tmp_path / 'cifar-10-batches-py' / 'test_batch',
           tmp_path / 'cifar-10-python.tar.gz', tmp_path]
  for spec in specs:
    ds = data.load_dataset(str(spec), arch='resnet20')
    assert len(ds) == 13 and ds.image_shape == (32, 32, 3) and ds.name == 'cifar10'
    # Pixel (h, w) of channel c sits at c * 1024 + h * 32 + w of a row.
    for i, h, w, c in [(0, 0, 0, 0), (3, 5, 7, 2), (12, 31, 30, 1)]:
      assert ds.images[i, h, w, c] == flat[i, c * 1024 + h * 32 + w]
    np.testing.assert_array_equal(ds.images.transpose(0, 3, 1, 2).reshape(13, -1), flat)
    np.testing.assert_array_equal(ds.labels, labels)


class _Evil:
  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_cifar_pickle_cannot_run_code(tmp_path):
  marker = tmp_path / 'pwned'
  d, _, _ = _cifar_batch(2, 0)
  d[b'data'] = _Evil(marker)
  evil = pickle.dumps(d, protocol=2)
  pickle.loads(evil)  # the plain unpickler runs the payload: it is live
  assert marker.exists()
  marker.unlink()
  batches = tmp_path / 'cifar-10-batches-py'
  batches.mkdir()
  (batches / 'test_batch').write_bytes(evil)
  with pytest.raises(ValueError, match=r'refusing to load (posix|os)\.system'):
    data.load_dataset(str(batches))
  with tarfile.open(tmp_path / 'evil.tar.gz', 'w:gz') as tar:
    tar.add(batches / 'test_batch', 'cifar-10-batches-py/test_batch')
  with pytest.raises(ValueError, match='refusing'):
    data.load_dataset(str(tmp_path / 'evil.tar.gz'))
  assert not marker.exists()
  # Other globals are refused as well, even harmless-looking builtins.
  with pytest.raises(ValueError, match='builtins.getattr'):
    data.safe_unpickle(pickle.dumps(getattr), what='x')


def test_cifar_malformed(tmp_path):
  p = tmp_path / 'test_batch'
  p.write_bytes(pickle.dumps({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}))
  with pytest.raises(ValueError, match=r'uint8 \[N, 3072\]'):
    data.load_dataset(str(p))
  p.write_bytes(pickle.dumps({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0]}))
  with pytest.raises(ValueError, match='2 images'):
    data.load_dataset(str(p))
  p.write_bytes(b'\x80\x02garbage')
  with pytest.raises(ValueError, match='pickle'):
    data.load_dataset(str(p))
  with tarfile.open(tmp_path / 'empty.tar.gz', 'w:gz') as tar:
    tar.addfile(tarfile.TarInfo('readme'), io.BytesIO(b''))
  with pytest.raises(ValueError, match='no test_batch'):
    data.load_dataset(str(tmp_path / 'empty.tar.gz'))


# --------------------------------------------------------------------------------------------
# npz, paths, batching


def test_npz_forms_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 10).astype(np.uint8)
  np.savez(tmp_path / 'rgb.npz', images=rgb, labels=labels, filenames=np.array(['a'] * 10))
  np.savez(tmp_path / 'gray.npz', images=gray, labels=labels)
  ds = data.load_dataset(str(tmp_path / 'rgb.npz'))
  np.testing.assert_array_equal(ds.images, rgb)
  assert ds.labels.dtype == np.int32 and ds.name == 'rgb.npz'
  ds = data.load_dataset(str(tmp_path / 'gray.npz'), arch='lenet_300_100')
  np.testing.assert_array_equal(ds.images, gray[..., None])

  np.savez(tmp_path / 'count.npz', images=rgb, labels=labels[:9])
  with pytest.raises(ValueError, match='10 images but 9 labels'):
    data.load_dataset(str(tmp_path / 'count.npz'))
  np.savez(tmp_path / 'nolabels.npz', images=rgb)
  with pytest.raises(ValueError, match='lacks'):
    data.load_dataset(str(tmp_path / 'nolabels.npz'))
  np.savez(tmp_path / 'float.npz', images=rgb.astype(np.float32), labels=labels)
  with pytest.raises(ValueError, match='uint8'):
    data.load_dataset(str(tmp_path / 'float.npz'))
  np.savez(tmp_path / 'obj.npz', images=np.array([None] * 10, dtype=object), labels=labels)
  with pytest.raises(ValueError, match='obj.npz'):
    data.load_dataset(str(tmp_path / 'obj.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not a readable'):
    data.load_dataset(str(tmp_path / 'junk.npz'))
  # The data must fit the architecture.
  with pytest.raises(ValueError, match=r'\(8, 8, 3\) but resnet20 expects \(32, 32, 3\)'):
    data.load_dataset(str(tmp_path / 'rgb.npz'), arch='resnet20')
  np.savez(tmp_path / 'labels.npz', images=gray, labels=labels + 10)
  with pytest.raises(ValueError, match='10 classes'):
    data.load_dataset(str(tmp_path / 'labels.npz'), arch='lenet_300_100')


def test_bad_paths(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.load_dataset(str(tmp_path / 'missing.npz'))
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match='unrecognized'):
    data.load_dataset(str(tmp_path / 'notes.txt'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no images'):
    data.load_dataset(str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='tfds:NAME'):
    data.load_dataset('tfds:')


def test_batches_subset_limit():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  labels = np.arange(10)
  ds = data.ArrayDataset(images, labels, name='t')
  assert [len(b[1]) for b in ds.batches(3)] == [3, 3, 3, 1]
  got_i, got_l = _all(ds, 3)
  np.testing.assert_array_equal(got_i, images)
  np.testing.assert_array_equal(got_l, labels)
  assert len(ds.subset(4)) == 4 and ds.subset(4).labels.tolist() == [0, 1, 2, 3]
  assert len(ds.subset(100)) == 10
  assert ds.limit(None) is ds and len(ds.limit(2)) == 2
  with pytest.raises(ValueError):
    ds.subset(0)
  with pytest.raises(ValueError):
    next(ds.batches(0))


# --------------------------------------------------------------------------------------------
# Image folders


SIZES = [(300, 200), (200, 300), (256, 256), (500, 260), (241, 611)]  # (w, h)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  return Image.fromarray(a)


def _reference(img: Image.Image, crop: int, resize: int) -> np.ndarray:
  """torchvision Resize(resize) + CenterCrop(crop) with the sizes written out by hand."""
  w, h = img.size
  if w <= h:
    nw, nh = resize, int(resize * h / w)
  else:
    nw, nh = int(resize * w / h), resize
  a = np.asarray(img.resize((nw, nh), Image.BILINEAR))
  top, left = int(round((nh - crop) / 2)), int(round((nw - crop) / 2))
  return a[top:top + crop, left:left + crop]


@pytest.fixture(scope='module')
def folder_tree(tmp_path_factory):
  """Layout A (class sub-folders), B (synset-prefixed flat), C (ILSVRC2012 val + CSV)."""
  root = tmp_path_factory.mktemp('imagenet')
  images = {}
  classes = ['n01440764', 'n01443537', 'n01484850']
  for i, size in enumerate(SIZES):
    img = _image(i, size)
    cls = classes[i % 3]
    images[i] = (img, cls)
    for layout, path in [('A', root / 'A' / cls / f'img{i}.png'),
                         ('B', root / 'B' / f'{cls}_{i}.png'),
                         ('C', root / 'C' / 'val' / f'ILSVRC2012_val_{i + 1:08d}.png')]:
      path.parent.mkdir(parents=True, exist_ok=True)
      img.save(path)
  (root / 'A' / 'n01440764' / 'notes.txt').write_text('ignored')
  (root / 'C' / 'LOC_val_solution.csv').write_text(
      'ImageId,PredictionString\n' + ''.join(
          f'ILSVRC2012_val_{i + 1:08d},{cls} 1 2 3 4 {cls} 5 6 7 8\n'
          for i, (_, cls) in images.items()))
  # A synset order in which the three classes are not 0, 1, 2.
  (root / 'C' / 'LOC_synset_mapping.txt').write_text(
      'n00000001 first\nn01484850 great white shark\nn00000002 other\n'
      'n01443537 goldfish\nn01440764 tench, Tinca tinca\n')
  return root, images, classes


def test_image_folder_layouts(folder_tree):
  root, images, classes = folder_tree
  for layout in ('A', 'B'):
    with pytest.warns(UserWarning, match='3 classes but the model has 1000'):
      ds = data.load_dataset(str(root / layout), arch='resnet18')
    assert isinstance(ds, data.LazyDataset) and len(ds) == len(SIZES)
    assert ds.image_shape == (224, 224, 3)
    got_i, got_l = _all(ds, 2)
    assert got_i.shape == (len(SIZES), 224, 224, 3) and got_i.dtype == np.uint8
    # A sorts by class folder then file name, B by file name: map back via the labels.
    order = sorted(images, key=lambda i: (images[i][1], f'img{i}.png')) if layout == 'A' else \
        sorted(images, key=lambda i: f'{images[i][1]}_{i}.png')
    for row, i in enumerate(order):
      img, cls = images[i]
      assert got_l[row] == classes.index(cls)
      np.testing.assert_array_equal(got_i[row], _reference(img, 224, 256))
  ds = data.load_dataset(str(root / 'C' / 'val'), arch='resnet18')
  got_i, got_l = _all(ds, 3)
  order = {'n01484850': 1, 'n01443537': 3, 'n01440764': 4}
  assert got_l.tolist() == [order[images[i][1]] for i in range(len(SIZES))]
  np.testing.assert_array_equal(got_i[1], _reference(images[1][0], 224, 256))
  assert ds.labels.tolist() == got_l.tolist()


def test_image_folder_sizes_threads_and_subset(folder_tree):
  root, images, _ = folder_tree
  with pytest.warns(UserWarning):
    small = data.load_dataset(str(root / 'B'), arch='resnet20')  # 32x32 crops of a 37 resize
  first = images[sorted(images, key=lambda i: f'{images[i][1]}_{i}.png')[0]][0]
  got_i, _ = _all(small, 10)
  assert got_i.shape == (len(SIZES), 32, 32, 3)
  np.testing.assert_array_equal(got_i[0], _reference(first, 32, 37))
  with pytest.warns(UserWarning):
    gray = data.load_dataset(str(root / 'B'), arch='lenet_300_100')
  g, _ = _all(gray, 10)
  assert g.shape == (len(SIZES), 28, 28, 1)
  np.testing.assert_array_equal(g[0, ..., 0], _reference(first.convert('L'), 28, 32))
  serial = data.load_image_folder(root / 'C' / 'val', workers=1)
  threaded = data.load_image_folder(root / 'C' / 'val', workers=3)
  for (a, la), (b, lb) in zip(serial.batches(2), threaded.batches(2)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  sub = threaded.subset(3)
  assert len(sub) == 3 and sub.labels.tolist() == threaded.labels[:3].tolist()
  mat = sub.materialize()
  assert isinstance(mat, data.ArrayDataset) and mat.images.shape == (3, 224, 224, 3)


def test_image_folder_unlabeled_and_corrupt(tmp_path):
  _image(0, (40, 30)).save(tmp_path / 'holiday.png')
  with pytest.raises(ValueError, match='cannot tell the class of holiday.png'):
    data.load_dataset(str(tmp_path))
  bad = tmp_path / 'cls' / 'broken.jpg'
  bad.parent.mkdir()
  bad.write_bytes(b'not a jpeg')
  (tmp_path / 'holiday.png').unlink()
  ds = data.load_dataset(str(tmp_path))
  with pytest.raises(ValueError, match='broken.jpg: cannot decode'):
    list(ds.batches(1))


def test_jpeg_folder(tmp_path):
  img = _image(3, (320, 240))
  (tmp_path / 'n01440764').mkdir()
  img.save(tmp_path / 'n01440764' / 'a.JPEG', quality=95)
  ds = data.load_dataset(str(tmp_path))
  (got, label), = list(ds.batches(4))
  assert got.shape == (1, 224, 224, 3) and label.tolist() == [0]
  decoded = Image.open(tmp_path / 'n01440764' / 'a.JPEG')
  np.testing.assert_array_equal(got[0], _reference(decoded.convert('RGB'), 224, 256))


# --------------------------------------------------------------------------------------------
# tfds (faked: the optional extra is not installed here)


def test_tfds_missing_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=r'lbyl_jax\[tfds\]'):
    data.load_dataset('tfds:cifar10')


def test_tfds_data_source(monkeypatch):
  rng = np.random.default_rng(0)
  calls = []
  small = [{'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 'label': i % 10}
           for i in range(7)]
  big = [{'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i}
         for i, (w, h) in enumerate(SIZES)]

  def data_source(name, split):
    calls.append((name, split))
    return big if name.startswith('imagenet') else small

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets',
                      types.SimpleNamespace(data_source=data_source))
  ds = data.load_dataset('tfds:cifar10', arch='resnet20')
  assert calls[-1] == ('cifar10', 'test') and ds.source == 'tfds:cifar10:test'
  got_i, got_l = _all(ds, 3)
  np.testing.assert_array_equal(got_i, np.stack([e['image'] for e in small]))
  assert got_l.tolist() == [e['label'] for e in small]
  ds = data.load_dataset('tfds:imagenet2012:validation[:5]')
  assert calls[-1] == ('imagenet2012', 'validation[:5]')
  got_i, got_l = _all(ds, 2)
  assert got_i.shape == (5, 224, 224, 3) and got_l.tolist() == list(range(5))
  np.testing.assert_array_equal(got_i[3], _reference(Image.fromarray(big[3]['image']), 224, 256))
  data.load_dataset('tfds:imagenet2012:5.1.0')
  assert calls[-1] == ('imagenet2012:5.1.0', 'validation')


# --------------------------------------------------------------------------------------------
# Named datasets: local first, then a verified download


def _dead_sources(monkeypatch):
  """Every download fails: proves that a lookup did not touch the network."""
  dead = {k: tuple(data.DataFile('http://127.0.0.1:9/' + f.filename, f.filename, f.md5) for f in v)
          for k, v in data.SOURCES.items()}
  monkeypatch.setattr(data, 'SOURCES', dead)


def test_named_from_env_and_cache(clean_env, monkeypatch, tmp_path):
  _dead_sources(monkeypatch)
  rng = np.random.default_rng(0)
  env_dir, cache = tmp_path / 'env', tmp_path / 'cache'
  monkeypatch.setenv('LBYL_JAX_DATA', str(env_dir))
  monkeypatch.setenv('LBYL_JAX_CACHE', str(cache))
  env_dir.mkdir()
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  np.savez(env_dir / 'cifar10_test.npz', images=images, labels=np.arange(6))
  flat, labels = _write_cifar(cache / 'data', 2)
  ds = data.load_dataset('cifar10', arch='resnet20')
  assert ds.name == 'cifar10' and ds.source == str(env_dir / 'cifar10_test.npz')
  np.testing.assert_array_equal(ds.images, images)
  (env_dir / 'cifar10_test.npz').unlink()
  ds = data.load_dataset('CIFAR-10')  # aliases; the user cache comes next
  assert ds.source == str(cache / 'data' / 'cifar-10-batches-py' / 'test_batch')
  np.testing.assert_array_equal(ds.labels, labels)
  # No arch, no spec: an error; an arch alone picks its dataset.
  with pytest.raises(ValueError, match='needs a data spec'):
    data.load_dataset(None)
  assert len(data.load_dataset(None, arch='resnet20', limit=4)) == 4
  with pytest.raises(ValueError, match='cannot be downloaded'):
    data.load_dataset('imagenet')
  _write_idx_pair(env_dir, 3, 3, gz=True)  # IDX files right in $LBYL_JAX_DATA
  assert len(data.load_dataset('fashion-mnist')) == 3


def test_named_download_verified(clean_env, monkeypatch, tmp_path):
  src = tmp_path / 'mirror'
  flat, labels = _write_cifar(src, 2)
  tgz = src / 'cifar-10-python.tar.gz'
  md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
  monkeypatch.setenv('LBYL_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(data, 'SOURCES', {'cifar10': (
      data.DataFile(tgz.as_uri(), 'cifar-10-python.tar.gz', '0' * 32),)})
  with pytest.raises(download.ChecksumError):
    data.load_dataset('cifar10', progress=False)
  assert not (tmp_path / 'cache' / 'data' / 'cifar-10-python.tar.gz').exists()
  with pytest.raises(ValueError, match='downloading is disabled'):
    data.load_dataset('cifar10', download=False)
  monkeypatch.setattr(data, 'SOURCES', {'cifar10': (
      data.DataFile(tgz.as_uri(), 'cifar-10-python.tar.gz', md5),)})
  ds = data.load_dataset('cifar10', progress=False)
  assert ds.source == str(tmp_path / 'cache' / 'data' / 'cifar-10-python.tar.gz')
  np.testing.assert_array_equal(ds.labels, labels)
  tgz.unlink()  # the mirror is gone: the cached archive is used
  np.testing.assert_array_equal(data.load_dataset('cifar10').labels, labels)


@pytest.mark.realdata
def test_named_fashion_mnist_download_with_official_md5(shared, clean_env, monkeypatch, tmp_path):
  """The official md5 sums in SOURCES accept the real files (served from file:// here)."""
  monkeypatch.setenv('LBYL_JAX_CACHE', str(tmp_path / 'cache'))
  real = shared / 'data' / 'fashion-mnist'
  mirrored = tuple(data.DataFile((real / pathlib.Path(f.filename).name).as_uri(), f.filename, f.md5)
                   for f in data.SOURCES['fashion_mnist'])
  monkeypatch.setattr(data, 'SOURCES', {**data.SOURCES, 'fashion_mnist': mirrored})
  ds = data.load_dataset('fashion_mnist', arch='lenet_300_100', progress=False)
  assert ds.source.startswith(str(tmp_path / 'cache' / 'data' / 'fashion-mnist'))
  ref = np.load(shared / 'data' / 'fashion_mnist_test.npz')
  np.testing.assert_array_equal(ds.labels, ref['labels'])
  monkeypatch.setenv('LBYL_JAX_DATA', str(shared / 'data'))
  assert data.load_dataset('fashion_mnist').source == str(shared / 'data' / 'fashion_mnist_test.npz')
  assert data.load_dataset('cifar10').source == str(shared / 'data' / 'cifar10_test.npz')
