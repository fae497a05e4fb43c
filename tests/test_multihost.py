"""Two processes on jax.distributed (CPU, 127.0.0.1) give exactly what one process gives.

Each test launches the real command line twice as two processes (``--coordinator-address
127.0.0.1:PORT --num-processes 2 --process-id 0|1``, a free port per launch) and once as a single
process, and compares: the saved variables bitwise (their SHA-256 in meta.json and the loaded
arrays), top-1 / top-5, every sweep row, and the per-example predictions and paired-comparison
counts of ``evaluate --compare``. Only process 0 may write outputs or print results; an error on
one process (an existing --out) must stop both.

The processes share a compilation cache directory (module fixture), run with
``JAX_PLATFORMS=cpu``, in their own session (killed as a group on timeout), and every launch has a
deadline, so a hung collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lbyl_jax.core import trees

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 240
LENET_WEIGHTS = 'lbyl_lenet_300_100.fashionmnist.pth.tar'


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('compile_cache')


def _env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  for var in ('XLA_FLAGS', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID'):
    env.pop(var, None)
  return env


def launch(argv: list[str], cwd: pathlib.Path, *, processes: int, cache: pathlib.Path,
           per_process: list[list[str]] | None = None) -> list[dict[str, object]]:
  """Runs ``python -m ARGV`` as ``processes`` processes (1: no distributed flags), process i
  with ``per_process[i]`` appended; per process its exit code, stdout and stderr. Kills every
  process group at the deadline."""
  port = free_port()
  procs = []
  for i in range(processes):
    extra = [] if processes == 1 else ['--coordinator-address', f'127.0.0.1:{port}',
                                       '--num-processes', str(processes), '--process-id', str(i)]
    extra += per_process[i] if per_process else []
    out = open(cwd / f'p{i}.out', 'w+b')  # pylint: disable=consider-using-with
    err = open(cwd / f'p{i}.err', 'w+b')  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(
        [sys.executable, '-m', *argv, '--compile-cache', str(cache), '--no-progress', *extra],
        cwd=cwd, env=_env(), stdout=out, stderr=err, start_new_session=True), out, err))
  deadline = time.monotonic() + DEADLINE_S
  results = []
  try:
    for proc, out, err in procs:
      try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        rc = None
      results.append(dict(rc=rc, out=out, err=err))
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  for r in results:
    for stream in ('out', 'err'):
      f = r[stream]
      f.seek(0)
      r[stream] = f.read().decode(errors='replace')
      f.close()
  if any(r['rc'] is None for r in results):
    pytest.fail(f'{" ".join(argv)}: a process passed the {DEADLINE_S} s deadline:\n'
                + '\n'.join(r['err'][-2000:] for r in results))
  return results


def ok(results, argv) -> list[dict[str, object]]:
  for i, r in enumerate(results):
    assert r['rc'] == 0, f'{" ".join(argv)}: process {i} exited {r["rc"]}:\n{r["err"][-3000:]}'
  return results


def last_json(text: str) -> dict:
  return json.loads([ln for ln in text.splitlines() if ln.startswith('{')][-1])


def stored(run: pathlib.Path) -> tuple[str, dict]:
  """(the SHA-256 recorded in meta.json, the digest of the variables loaded back)."""
  import lbyl_jax  # pylint: disable=import-outside-toplevel

  meta = json.loads((run / 'meta.json').read_text())
  return meta['variables_sha256'], trees.digest(lbyl_jax.load(run).variables)


def test_restore_random_resnet20_same_variables_only_process0_writes(tmp_path, cache):
  argv = ['lbyl_jax.restore', '--arch', 'resnet20', '--weights', 'random', '--json']
  one = ok(launch(argv + ['--out', 'single'], tmp_path, processes=1, cache=cache), argv)
  two = ok(launch(argv + ['--out', 'multi'], tmp_path, processes=2, cache=cache), argv)
  assert stored(tmp_path / 'single') == stored(tmp_path / 'multi')
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ['multi', 'single']
  a, b = last_json(one[0]['out']), last_json(two[0]['out'])
  assert (a['widths'], a['flops_after'], a['params_after']) == (
      b['widths'], b['flops_after'], b['params_after'])
  assert 'saved:' in two[0]['out'] and 'saved:' not in two[1]['out']
  assert '{' not in two[1]['out'] and 'error' not in two[1]['err']


@pytest.mark.realdata
def test_sweep_and_compare_match_a_single_process(tmp_path, cache, shared):
  weights = shared / 'weights' / LENET_WEIGHTS
  data = shared / 'data' / 'fashion_mnist_test.npz'
  sweep = ['lbyl_jax.restore', '--arch', 'lenet_300_100', '--weights', str(weights), '--sweep',
           '--methods', 'prune,lbyl', '--ratios', '0.5', '--data', str(data), '--limit', '1000',
           '--batch-size', '200', '--no-throughput', '--save-models']
  ok(launch(sweep + ['--out', 'sweep1'], tmp_path, processes=1, cache=cache), sweep)
  ok(launch(sweep + ['--out', 'sweep2'], tmp_path, processes=2, cache=cache), sweep)
  s1 = json.loads((tmp_path / 'sweep1' / 'sweep.json').read_text())
  s2 = json.loads((tmp_path / 'sweep2' / 'sweep.json').read_text())
  assert s1['baseline']['n'] == s2['baseline']['n'] == 1000
  assert (s1['baseline']['top1'], s1['baseline']['top5']) == (s2['baseline']['top1'],
                                                              s2['baseline']['top5'])
  keys = ('method', 'ratio', 'widths', 'flops_after', 'top1_before', 'top1_after', 'top5_after')
  assert [[r[k] for k in keys] for r in s1['rows']] == [[r[k] for k in keys] for r in s2['rows']]
  models1 = sorted((tmp_path / 'sweep1' / 'models').iterdir())
  models2 = sorted((tmp_path / 'sweep2' / 'models').iterdir())
  assert [m.name for m in models1] == [m.name for m in models2] and len(models1) == 2
  for m1, m2 in zip(models1, models2):  # the row computed by process 1 is recomputed by 0
    assert stored(m1) == stored(m2)

  # Paired comparison of the two saved models: per-example bits gathered in dataset order.
  compare = ['lbyl_jax.evaluate', '--compare', str(models1[0]), str(models1[1]), '--data',
             str(data), '--limit', '1000', '--batch-size', '200', '--json']
  one = ok(launch(compare + ['--per-example', 'one.npz'], tmp_path, processes=1, cache=cache),
           compare)
  two = ok(launch(compare + ['--per-example', 'two.npz'], tmp_path, processes=2, cache=cache),
           compare)
  r1, r2 = last_json(one[0]['out']), last_json(two[0]['out'])
  for k in ('n', 'top1_a', 'top1_b', 'only_a', 'only_b', 'mcnemar_p'):
    assert r1[k] == r2[k], k
  assert r1['only_a'] + r1['only_b'] > 0  # the comparison has discordant examples to get right
  e1, e2 = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
  assert sorted(e1.files) == sorted(e2.files) == ['correct_a', 'correct_b', 'labels', 'pred_a',
                                                  'pred_b']
  for k in e1.files:
    np.testing.assert_array_equal(e1[k], e2[k], err_msg=k)
  assert len(e1['pred_a']) == 1000 and 100 * e1['correct_a'].mean() == r1['top1_a']
  assert '{' not in two[1]['out']


def test_an_error_on_one_process_stops_both(tmp_path, cache):
  (tmp_path / 'taken').mkdir()
  argv = ['lbyl_jax.restore', '--arch', 'resnet20', '--weights', 'random', '--out', 'taken']
  res = launch(argv, tmp_path, processes=2, cache=cache)
  assert [r['rc'] for r in res] == [1, 1]
  assert 'already exists' in res[0]['err'] and '[process 0/2]' in res[0]['err']
  assert 'checking --out failed on process(es) 0' in res[1]['err']
  assert list((tmp_path / 'taken').iterdir()) == []


def test_processes_with_different_weights_are_refused(tmp_path, cache):
  argv = ['lbyl_jax.restore', '--arch', 'resnet20', '--weights', 'random', '--out', 'run']
  res = launch(argv, tmp_path, processes=2, cache=cache,
               per_process=[['--init-seed', '0'], ['--init-seed', '1']])
  assert [r['rc'] for r in res] == [1, 1]
  for r in res:
    assert 'the processes disagree on the loaded weights' in r['err'], r['err'][-2000:]
  assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------------------------
# The pieces, in one process.


def test_shards_partition_the_dataset_in_order():
  from lbyl_jax.io import data as data_lib  # pylint: disable=import-outside-toplevel

  for n in (0, 1, 5, 7, 1000):
    for count in (1, 2, 3, 8):
      bounds = [data_lib.shard_bounds(n, i, count) for i in range(count)]
      assert bounds[0][0] == 0 and bounds[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
      assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
  images = np.arange(7 * 2 * 2 * 1, dtype=np.uint8).reshape(7, 2, 2, 1)
  labels = np.arange(7)
  ds = data_lib.ArrayDataset(images, labels, name='t')
  lazy = data_lib.LazyDataset(lambda i: (images[i], int(labels[i])), range(7),
                              image_shape=(2, 2, 1), name='t', source='t', workers=1)
  for d in (ds, lazy):
    parts = [d.shard(i, 3) for i in range(3)]
    got = np.concatenate([np.concatenate([b[1] for b in p.batches(2)]) for p in parts])
    np.testing.assert_array_equal(got, labels)
  assert len(ds.shard(0, 8)) == 0 and len(lazy.shard(0, 8)) == 0  # 7 examples, 8 parts
  assert sum(len(ds.shard(i, 8)) for i in range(8)) == 7
  with pytest.raises(ValueError, match='shard index'):
    ds.shard(3, 3)
  with pytest.raises(ValueError, match='shard count'):
    ds.shard(0, 0)


def test_flags_are_checked_and_nothing_given_means_one_process(monkeypatch):
  from lbyl_jax.core import distributed  # pylint: disable=import-outside-toplevel

  for var in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID'):
    monkeypatch.delenv(var, raising=False)
  bad = [(('localhost', None, None), '--coordinator-address: expected HOST:PORT'),
         (('localhost:99999', None, None), 'port out of range'),
         ((None, 0, None), '--num-processes must be >= 1'),
         ((None, 2, 2), '--process-id 2 is not below --num-processes 2'),
         ((None, None, -1), '--process-id must be >= 0')]
  if not distributed._on_cloud_tpu_vm():  # pylint: disable=protected-access
    bad.append(((None, 2, 0), 'needs --coordinator-address'))
  for args, message in bad:
    with pytest.raises(ValueError, match=message):
      distributed.check_flags(*args)
  distributed.check_flags('10.0.0.1:1234', 4, 3)
  distributed.check_flags('[::1]:1234', 2, 1)
  if not distributed._on_cloud_tpu_vm():  # pylint: disable=protected-access
    assert distributed.detect() is None
    assert distributed.initialize() == distributed.Setup(0, 1, 'single')
  assert distributed.initialize(num_processes=1) == distributed.Setup(0, 1, 'single')
  # A SLURM job step with several tasks is detected (and started by JAX's own detection).
  for var, value in (('SLURM_JOB_ID', '7'), ('SLURM_STEP_NODELIST', 'n[1-2]'),
                     ('SLURM_NTASKS', '2'), ('SLURM_PROCID', '1'), ('SLURM_LOCALID', '0')):
    monkeypatch.setenv(var, value)
  assert distributed.detect() == 'slurm'
  distributed.check_flags(None, 2, None)  # the coordinator comes from SLURM
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detect() in (None, 'tpu')
