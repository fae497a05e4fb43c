"""The shortcuts behind the whole-command speed (issue 16) give exactly what they replace.

- variable shapes at pruned widths derived from ONE original-width trace and the discovered units
  equal those of a fresh trace at those widths, and the discovered MAC count on them equals the
  count on a fresh jaxpr (every preset family);
- the trace and the discovery kept on disk next to the compilation cache read back equal, are
  rebuilt when unreadable, and are not kept with the cache off; the copies shipped with the
  package exist for every preset under the current keys, equal a fresh trace / discovery, and
  serve a first run with an empty cache without tracing;
- the consumer geometry discovery records equals the one an interceptor on ``model.apply``
  records (the implementation before discovery);
- ReLU moments computed in fixed-length chunks equal the exact-length computation bitwise;
- the default bias correction (no moment propagation, one consumer kernel at a time, none for
  consumers without padded taps) equals the path that builds every consumer's terms and uses
  propagated moments, bitwise;
- deferred solver systems give the same rows as eager ones, and a wrong declaration is an error;
- the single-threaded BLAS context reaches SciPy's OpenBLAS, which jaxlib's LAPACK kernels use;
- the solver executables ``pipeline.prepare`` compiles from the architecture's shapes alone are
  exactly those ``compress`` then needs (no other compile, and every one used), and the problems'
  shapes ``selection.unit_dims`` predicts equal those ``build_problems`` makes;
- the commands end without the interpreter's teardown and keep their exit codes and output.

The timings themselves are measured by ``python -m benchmarks.command_speed``, not here.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.cli import common
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import archs
from lbyl_jax.models import discover as discover_lib
from lbyl_jax.models import shipped
from lbyl_jax.models import trace
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import moments
from lbyl_jax.pruning import selection
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import stats
from lbyl_jax.pruning.methods import lbyl
from lbyl_jax.plan import Plan

PRESETS = ('resnet20', 'resnet56_b', 'resnet18', 'resnet50', 'vgg16_bn_cifar', 'vgg16_bn',
           'lenet_300_100')


def _shapes(tree):
  return jax.tree_util.tree_map(lambda s: (tuple(s.shape), np.dtype(s.dtype).name), tree)


@pytest.mark.parametrize('name', PRESETS)
def test_derived_shapes_and_macs_equal_a_fresh_trace(name):
  spec = archs.get(name)
  rs = np.random.default_rng(len(name))
  widths = tuple(int(rs.integers(1, w + 1)) for w in spec.default_widths())
  model = spec.build(widths)
  fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec.dummy_input()))
  derived = spec.abstract_variables(widths)
  assert _shapes(derived) == _shapes(fresh)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), np.float32)
  jaxpr_count = trace.jaxpr_macs(jax.make_jaxpr(model.apply)(fresh, x).jaxpr)
  assert spec.discovery.macs(derived) == jaxpr_count == stats.traced_macs(spec, widths)
  assert stats.summary(spec, spec.init(0, widths))['macs'] == jaxpr_count
  assert spec.discovery.macs(spec.abstract_variables()) == stats.traced_macs(spec)


def test_derived_shapes_refuse_bad_widths():
  spec = archs.get('resnet20')
  with pytest.raises(ValueError, match='expected 9 widths'):
    trace.abstract_variables_at(spec, (4,) * 8)
  with pytest.raises(ValueError, match='has 16 channels, asked for 17'):
    trace.abstract_variables_at(spec, (17,) + (4,) * 8)


def test_trace_on_disk_reads_back_equal(tmp_path):
  spec = archs.get('resnet20')
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  try:
    trace.trace_layers.cache_clear()
    first = trace.trace_layers(spec)
    (path,) = (tmp_path / trace.DISK_SUBDIR).iterdir()
    trace.trace_layers.cache_clear()
    again = trace.trace_layers(spec)
    assert again is not first
    assert (again.order, dict(again.bn)) == (first.order, dict(first.bn))
    assert _shapes(again.abstract) == _shapes(first.abstract)
    path.write_text('{"order": [')  # unreadable: traced again and replaced
    trace.trace_layers.cache_clear()
    assert trace.trace_layers(spec).order == first.order
    assert path.read_text().startswith('{"order"') and len(path.read_text()) > 100
    jax.config.update('jax_compilation_cache_dir', None)
    assert trace._disk_path(spec) is None  # pylint: disable=protected-access  (cache off)
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)
    trace.trace_layers.cache_clear()


@pytest.mark.parametrize('name', ('resnet20', 'resnet50', 'vgg16_bn', 'lenet_300_100'))
def test_discovery_on_disk_reads_back_equal(name, tmp_path, monkeypatch):
  spec = archs.get(name)
  fresh = discover_lib.discover(spec.model, spec.abstract_variables(), (1, *spec.input_shape),
                                policy=spec.policy)
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  try:
    first = dataclasses.replace(spec).discovery  # a new instance: nothing cached in memory
    assert first == fresh
    (path,) = (tmp_path / trace.DISK_SUBDIR).glob(f'{name}-discovery-*.json')

    def refuse(*args, **kwargs):
      raise AssertionError('discovered again instead of reading the file')

    with monkeypatch.context() as m:
      m.setattr(discover_lib, 'discover', refuse)
      again = dataclasses.replace(spec).discovery
    assert again == fresh
    assert units_lib.discovery_to_json(again) == units_lib.discovery_to_json(fresh)
    path.write_text('{"units": [')  # unreadable: discovered again and replaced
    assert dataclasses.replace(spec).discovery == fresh
    assert len(path.read_text()) > 100
    jax.config.update('jax_compilation_cache_dir', None)
    assert trace._disk_path(spec, 'discovery') is None  # pylint: disable=protected-access
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)


def _tap_fraction(size: int, k: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  out = (size + pad[0] + pad[1] - k) // stride + 1
  idx = np.arange(out)[:, None] * stride - pad[0] + np.arange(k)[None, :]
  return ((idx >= 0) & (idx < size)).mean(axis=0)


def _geometry_from_apply(spec):
  """The implementation before discovery: tap fractions recorded by an interceptor on
  model.apply."""
  consumers = {u.consumer: u.name for u in spec.units if u.consumer_kind == 'conv'}
  geo = {}

  def interceptor(next_fun, args, kwargs, ctx):
    path = '/'.join(ctx.module.path)
    if ctx.method_name == '__call__' and path in consumers and isinstance(ctx.module, nn.Conv):
      mod, shape = ctx.module, args[0].shape
      fr = [_tap_fraction(shape[1 + a], mod.kernel_size[a], mod.strides[a], tuple(mod.padding[a]))
            for a in range(2)]
      geo[consumers[path]] = np.outer(fr[0], fr[1])
    return next_fun(*args, **kwargs)

  abstract = spec.abstract_variables()
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: spec.model.apply(v, x), abstract, spec.dummy_input())
  return geo


@pytest.mark.parametrize('name', ('resnet20', 'resnet50', 'vgg16_bn_cifar'))
def test_consumer_geometry_equals_the_apply_interceptor(name):
  spec = archs.get(name)
  new = {u.name: u.consumers[0].geometry.tap_fractions().reshape(
      u.consumers[0].geometry.window) for u in spec.units if u.consumer_kind == 'conv'}
  old = _geometry_from_apply(spec)
  assert new.keys() == old.keys() and len(new) > 0
  for k in new:
    np.testing.assert_array_equal(new[k], old[k], err_msg=k)


def test_chunked_relu_moments_equal_exact_length_bitwise():
  rs = np.random.default_rng(0)
  for n in (1, 7, 64, 300, moments.RELU_CHUNK, moments.RELU_CHUNK + 5, 3 * moments.RELU_CHUNK):
    mean = rs.normal(size=n) * rs.choice([0.01, 1.0, 10.0])
    var = rs.uniform(0, 2, size=n) ** 2
    var[::5] = 0.0
    e1, e2 = moments.rectified_moments(mean, var)
    with jax.enable_x64(True):
      r1, r2 = jax.jit(moments.relu_moments)(
          jnp.asarray(mean), jnp.sqrt(jnp.maximum(jnp.asarray(var), 0.0)))
    np.testing.assert_array_equal(e1, np.asarray(r1))
    np.testing.assert_array_equal(e2, np.asarray(r2))


@pytest.fixture(scope='module')
def r20():
  spec = archs.get('resnet20')
  variables = spec.init(0)
  problems = selection.build_problems(spec, variables, selection.Selection(ratio=0.4))
  sols = lbyl.solve_problems(problems, lam1=1e-5, lam2=1e-3)
  return spec, variables, problems, sols


def test_default_bias_correction_equals_the_full_consumer_path(r20):
  spec, variables, problems, sols = r20
  got = bias_lib.constants(spec, variables, problems, sols)
  # The eager path: propagated moments, every consumer's terms built, every constant folded.
  mom = moments.propagate(spec, variables)
  means = moments.activation_means(spec, variables, problems, moments=mom)
  cons = bias_lib.consumer_terms(spec, variables, problems, mom)
  folded = 0
  for p, s, E, con, c in zip(problems, sols, means, cons, got):
    ref = 1.0 * (E[p.prune] - np.asarray(s.S_P, np.float64) @ E[p.keep])
    ref = bias_lib.fold_constant(con, p.prune, ref)
    np.testing.assert_array_equal(c, ref, err_msg=p.unit.name)
    folded += bool(np.any(con.tap_weight != 1.0))
  assert folded == len(problems)  # 3x3 consumers: every constant was made padding-aware
  assert all(bias_lib.needs_fold(p.unit.consumers[0]) for p in problems)
  all_taps = bias_lib.constants(spec, variables, problems, sols, fold='all_taps')
  assert any(not np.array_equal(a, b) for a, b in zip(all_taps, got))


def test_deferred_systems_solve_like_eager_ones(r20):
  _, _, problems, _ = r20
  eager = [lbyl.build_system(p, lam1=1e-5, lam2=1e-3, mode='consistent') for p in problems]
  a = solvers.solve(eager)
  b = lbyl.solve_problems(problems, lam1=1e-5, lam2=1e-3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.S_P, y.S_P)
  p = problems[0]
  wrong = solvers.Deferred('shared', p.m, int(p.prune.size), int(p.W.shape[1]) + 1,
                           lambda: eager[0], 'wrong')
  with pytest.raises(ValueError, match='wrong: the system built has'):
    solvers.solve([wrong])


def test_single_threaded_blas_reaches_scipys_openblas():
  if jax.default_backend() != 'cpu':
    pytest.skip('the context only acts on the CPU backend')
  with solvers.single_threaded_blas():
    setters = solvers._openblas_thread_setters()  # pylint: disable=protected-access
    assert setters, 'no OpenBLAS found in the process'
    assert all(get() == 1 for get, _ in setters)


def test_the_cli_imports_no_heavy_optional_module():
  """Importing the restore / evaluate commands loads no SciPy submodule and no PIL: each is
  imported where it is used (0.1-0.4 s each on a 2-core CPU; `python -X importtime` finds them)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys, lbyl_jax.cli.restore, lbyl_jax.cli.evaluate; '
          'print(",".join(sorted(m for m in sys.modules if m.split(".")[0] == "PIL" '
          'or m in ("scipy.stats", "scipy.optimize", "scipy.special", "scipy.spatial", '
          '"scipy.linalg"))))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '', out.stdout


@pytest.mark.parametrize('arch,options', [
    ('resnet20', dict(method='lbyl', ratio=0.3)),
    ('resnet56_b', dict(method='lbyl', ratio=0.5, ratio_overrides=(('layer3_*', 0.2),))),
    ('lenet_300_100', dict(method='lbyl', ratio=0.4)),
    ('vgg16_bn_cifar', dict(method='lbyl', ratio=0.3, lbyl_mode='reference_code')),
])
def test_prepare_compiles_exactly_what_compress_uses(arch, options):
  spec = archs.get(arch)
  plan = Plan.from_options(**options)
  variables = spec.init(0)
  problems = selection.build_problems(spec, variables, plan.selection)
  assert selection.unit_dims(spec, spec.abstract_variables(), plan.selection) == [
    (p.m, int(p.prune.size), int(np.shape(p.W)[1])) for p in problems]
  solvers.clear_cache()
  t0 = solvers.trace_count()
  started = pipeline.prepare(spec, plan)  # before any weights, like the command
  assert started > 0
  result = pipeline.compress(spec, variables, plan)
  assert solvers.trace_count() - t0 == started
  assert not solvers._PENDING  # pylint: disable=protected-access
  assert result.report['compile_seconds'] >= 0
  solvers.clear_cache()


_EXIT_CHILD = """
import atexit
import sys
from lbyl_jax.cli import common
atexit.register(lambda: print('[atexit]', end=''))  # the interpreter's teardown runs it
def main():
  print('out', end='')
  print('err', end='', file=sys.stderr)
  raise SystemExit(CODE)
common.exit_without_teardown(main)
print('not reached')
"""


@pytest.mark.parametrize('code,status,err', [
    ('None', 0, 'err'), ('0', 0, 'err'), ('3', 3, 'err'), ("'bad input'", 1, 'errbad input\n')])
def test_exit_without_teardown_keeps_output_and_status(code, status, err):
  proc = subprocess.run([sys.executable, '-c', _EXIT_CHILD.replace('CODE', code)],
                        capture_output=True, text=True, timeout=120, check=False)
  assert (proc.returncode, proc.stdout, proc.stderr) == (status, 'out', err)


_WARM_CHILD = """
import json
from lbyl_jax import pipeline
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.pruning import moments
spec = archs.get('resnet20')
for _ in range(2):  # the command and compress both call prepare: one warm-up
  pipeline.prepare(spec, Plan.from_options(method='lbyl', ratio=0.3, bias_correction='BC'))
for fut in moments._WARMING:
  fut.result()
print(json.dumps({'started': len(moments._WARMING),
                  'compiled': moments._relu_moments_jit._cache_size()}))
"""


@pytest.mark.parametrize('bc,want', [('on', 1), ('off', 0)])
def test_prepare_warms_the_bias_corrections_moment_kernel_once(bc, want):
  proc = subprocess.run([sys.executable, '-c', _WARM_CHILD.replace('BC', bc)],
                        capture_output=True, text=True, timeout=300, check=True)
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {'started': want, 'compiled': want}


_MEMORY_CHILD = """
import json
from numpy._core import multiarray
from lbyl_jax.cli import common
done = common.tune_process_memory()
done['hugepage_after'] = multiarray._set_madvise_hugepage(False)  # returns the previous setting
print(json.dumps(done))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt: Linux only')
@pytest.mark.parametrize('user_env', [None, 'LBYL_JAX_DEFAULT_MALLOC', 'MALLOC_ARENA_MAX'])
def test_commands_tune_the_allocator_unless_the_user_did(user_env):
  env = {k: v for k, v in os.environ.items() if k not in common._MEMORY_ENV}  # pylint: disable=protected-access
  if user_env is not None:
    env[user_env] = '1' if user_env == 'LBYL_JAX_DEFAULT_MALLOC' else '4'
  proc = subprocess.run([sys.executable, '-c', _MEMORY_CHILD], capture_output=True, text=True,
                        timeout=120, check=True, env=env)
  got = json.loads(proc.stdout)
  if user_env is None:
    assert got == {'mallopt': True, 'numpy_hugepage_off': True, 'hugepage_after': False}
  else:  # untouched: NumPy keeps its default hint (on where the kernel supports it)
    assert got['mallopt'] is False and got['numpy_hugepage_off'] is False


def test_shipped_traces_exist_for_every_preset_under_the_current_keys(tmp_path):
  missing = []
  for name in archs.names():
    spec = archs.get(name)
    if not shipped.eligible(spec):
      continue
    for fname in shipped.expected_files(spec, str(tmp_path)):
      if not (trace.SHIPPED_DIR / (fname + '.gz')).is_file():
        missing.append(fname)
  assert not missing, (f'shipped traces missing or stale: {missing}; regenerate them with '
                       '`python -m lbyl_jax.models.shipped` and commit lbyl_jax/models/traces')
  assert len(list(trace.SHIPPED_DIR.glob('*.json.gz'))) == 2 * sum(
      shipped.eligible(archs.get(n)) for n in archs.names())  # no stale leftovers


@pytest.mark.parametrize('name', ('resnet20', 'resnet50', 'vgg16_bn', 'lenet_300_100'))
def test_shipped_traces_equal_a_fresh_trace_and_serve_a_cold_cache(name, tmp_path, monkeypatch):
  spec = archs.get(name)
  traced = trace.trace_module(spec.model, spec.dummy_input())
  fresh = discover_lib.discover(spec.model, traced.abstract, (1, *spec.input_shape),
                                apply_kwargs=dict(spec.apply_kwargs), policy=spec.policy)
  t_name, d_name = shipped.expected_files(spec, str(tmp_path))
  read = lambda n: json.loads(gzip.decompress((trace.SHIPPED_DIR / (n + '.gz')).read_bytes()))
  assert read(t_name) == json.loads(json.dumps(trace._to_json(traced)))  # pylint: disable=protected-access
  assert read(d_name) == json.loads(json.dumps(units_lib.discovery_to_json(fresh)))

  def refuse(*args, **kwargs):
    raise AssertionError('traced instead of reading the shipped copy')

  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  try:
    trace.trace_layers.cache_clear()
    with monkeypatch.context() as m:
      m.setattr(trace, 'trace_module', refuse)
      m.setattr(discover_lib, 'discover', refuse)
      cold = dataclasses.replace(spec)
      assert cold.discovery == fresh
      assert _shapes(cold.abstract_variables()) == _shapes(traced.abstract)
    # ... and the disk cache now holds them, as after a first run that traced.
    assert sorted(p.name for p in (tmp_path / trace.DISK_SUBDIR).iterdir()) == sorted(
        [t_name, d_name])
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)
    trace.trace_layers.cache_clear()


def test_a_profiler_still_gets_its_results(tmp_path):
  out = tmp_path / 'prof.out'
  child = _EXIT_CHILD.replace('CODE', '0')
  script = tmp_path / 'child.py'
  script.write_text(child)
  proc = subprocess.run([sys.executable, '-m', 'cProfile', '-o', str(out), str(script)],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and out.is_file() and out.stat().st_size > 0
  assert proc.stdout == 'out[atexit]'
  proc = subprocess.run([sys.executable, '-c', _EXIT_CHILD.replace('CODE', '5')],
                        capture_output=True, text=True, timeout=120, check=False,
                        env=dict(os.environ, LBYL_JAX_FULL_EXIT='1'))
  assert (proc.returncode, proc.stdout) == (5, 'out[atexit]')


def _speed_row(modes=('cold', 'warm'), phases=None):
  from benchmarks import command_speed  # pylint: disable=import-outside-toplevel

  run = dict(import_=dict(load_before=0.5, load_after=0.5), command=dict(load_after=0.5))
  mode = dict(command_wall=dict(min=2.0, median=2.1), command_cpu=dict(min=2.5, median=2.6),
              import_wall=dict(min=0.7, median=0.75), import_cpu=dict(min=0.8, median=0.85),
              ratio_wall=dict(min=2.8, median=2.8), maxrss_mib=700.0, load=dict(min=0.5),
              phases=dict({'compress': 0.6, 'compress/bias_correction': 0.03}, **(phases or {})),
              runs=[run])
  return command_speed, dict(label='x', arch='resnet50', **{m: mode for m in modes})


def test_command_speed_tables_warm_only_rows_and_unjudged_targets():
  command_speed, row = _speed_row(modes=('warm',), phases={'bn_reestimate': 1.5})
  text = command_speed.table([row])
  assert '| x | resnet50 | warm |' in text and '| cold |' not in text
  assert 'bn_reestimate' in text.splitlines()[0]
  assert command_speed.targets(row) == [
      'warm 2.80x import (meets <= 3x)', "warm CPU 3.06x the import's",
      'bias correction 5.0 % of compress (meets <= 10 %)']
  assert command_speed.targets(row, judge=False) == [
      'warm 2.80x import', "warm CPU 3.06x the import's", 'bias correction 5.0 % of compress']
  _, both = _speed_row()
  assert 'cold 2.10 s (meets < 5 s)' in command_speed.targets(both)
  assert 'bn_reestimate' not in command_speed.table([both]).splitlines()[0]
