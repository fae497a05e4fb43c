"""What orbax's zstd buys and costs on the package's checkpoints.

Measured 2026-11-26 (2-core CPU): zstd shrank the float checkpoints by 6.6-8.0 %, a 4-bit
quantized ResNet-56 by 19.0 % and an 8-bit one by 5.0 %, and cost 0.03 s wall / 0.10 CPU-s of a
0.64 s ResNet-152 save. So ``lbyl_jax.io.checkpoint`` keeps orbax's default (compressed); an
earlier, confounded comparison (StandardCheckpointer with zstd against the PyTree handler
without, on the unpruned tree) had suggested half of the save's CPU time.

Bytes on disk of the orbax directory with and without zstd for the trained checkpoints in
``../shared/weights`` (ResNet-56, NM ResNet-56, LeNet-300-100) and for 4- / 8-bit RTN-quantized
ResNet-56 trees (LBYL 30 %), then the wall and CPU seconds (process user + system, all threads)
of ``Compressed.save`` for a random-weight ResNet-152 after LBYL 30 %, alternating the two
settings (the first save of the process, which imports orbax's writer, is discarded).

  python -m benchmarks.probes.checkpoint_compression [--repeats 5]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import shutil
import statistics
import tempfile
import time

from benchmarks import bn_reestimate as bnr
from lbyl_jax import pipeline
from lbyl_jax.io import checkpoint
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan

CHECKPOINTS = (('resnet56', 'weights/resnet56-4bfd9763.th'),
               ('resnet56_b', 'weights/nm_resnet56.cifar10.pth.tar'),
               ('lenet_300_100', 'weights/lbyl_lenet_300_100.fashionmnist.pth.tar'))


def _write(path: pathlib.Path, tree, compress: bool) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=compress)) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))
    ckptr.wait_until_finished()


def _bytes(tree, tmp: pathlib.Path, compress: bool) -> int:
  out = tmp / f'bytes_{compress}'
  shutil.rmtree(out, ignore_errors=True)
  _write(out, tree, compress)
  return sum(f.stat().st_size for f in out.rglob('*') if f.is_file())


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args()
  shared = bnr.shared_dir()
  with tempfile.TemporaryDirectory(prefix='lbyl_ckpt_zstd_') as tmp:
    tmp = pathlib.Path(tmp)
    trees = []
    for arch, rel in CHECKPOINTS:
      spec = archs.get(arch)
      v, _ = weights_lib.load_weights(spec, str(shared / rel), download=False, progress=False)
      trees.append((f'{arch} (float)', v))
      if arch == 'resnet56':
        for bits in (4, 8):
          res = pipeline.compress(spec, v, Plan.from_options(method='lbyl', ratio=0.3,
                                                             quant_method='rtn', bits=bits))
          trees.append((f'{arch} LBYL 30 % + RTN W{bits}', res.qtree))
    print('| tree | bytes, zstd | bytes, none | zstd saves |\n|---|---|---|---|')
    for name, tree in trees:
      on, off = _bytes(tree, tmp, True), _bytes(tree, tmp, False)
      print(f'| {name} | {on} | {off} | {100 * (1 - on / off):.1f} % |')

    spec = archs.get('resnet152')
    res = pipeline.compress(spec, spec.init(0), Plan.from_options(method='lbyl', ratio=0.3))
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    original = checkpoint._write_orbax  # pylint: disable=protected-access
    for i in range(args.repeats + 1):
      for compress in (True, False):
        checkpoint._write_orbax = lambda path, tree, c=compress: _write(path, tree, c)  # pylint: disable=protected-access
        out = tmp / 'save'
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), _cpu()
        res.save(out)
        if i:  # the first round imports orbax's writer
          times[compress].append((time.perf_counter() - t0, _cpu() - c0))
    checkpoint._write_orbax = original  # pylint: disable=protected-access
    print('\nresnet152 LBYL 30 % (random weights), Compressed.save, median of '
          f'{args.repeats}:')
    for compress in (True, False):
      wall = statistics.median(t for t, _ in times[compress])
      cpu = statistics.median(c for _, c in times[compress])
      print(f'  zstd {"on " if compress else "off"}: {wall:.3f} s wall, {cpu:.3f} CPU-s')


if __name__ == '__main__':
  main()
