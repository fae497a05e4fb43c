"""The shortcuts behind the whole-command speed (issue 16) give exactly what they replace.

- variable shapes and MACs at pruned widths derived from ONE original-width trace equal those of a
  fresh trace at those widths (every preset family);
- the trace kept on disk next to the compilation cache reads back equal, is rebuilt when
  unreadable, and is not kept with the cache off;
- the consumer geometry read off that trace equals the one an interceptor on ``model.apply``
  records (the previous implementation);
- ReLU moments computed in fixed-length chunks equal the exact-length computation bitwise;
- the default bias correction (no moment propagation, one consumer kernel at a time, none for
  consumers without padded taps) equals the full-consumer path bitwise;
- deferred solver systems give the same rows as eager ones, and a wrong declaration is an error;
- the single-threaded BLAS context reaches SciPy's OpenBLAS, which jaxlib's LAPACK kernels use.

The timings themselves are measured by ``python -m benchmarks.command_speed``, not here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import moments
from lbyl_jax.pruning import selection
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import stats
from lbyl_jax.pruning.methods import lbyl

PRESETS = ('resnet20', 'resnet56_b', 'resnet18', 'resnet50', 'vgg16_bn_cifar', 'vgg16_bn',
           'lenet_300_100')


def _shapes(tree):
  return jax.tree_util.tree_map(lambda s: (tuple(s.shape), np.dtype(s.dtype).name), tree)


@pytest.mark.parametrize('name', PRESETS)
def test_derived_shapes_and_macs_equal_a_fresh_trace(name):
  spec = archs.get(name)
  rs = np.random.default_rng(len(name))
  widths = tuple(int(rs.integers(1, w + 1)) for w in spec.default_widths())
  fresh = trace.trace_module(spec.build(widths), spec.dummy_input())
  assert _shapes(spec.abstract_variables(widths)) == _shapes(fresh.abstract)
  assert stats.macs(spec, widths) == fresh.jaxpr_macs == stats.traced_macs(spec, widths)
  assert stats.macs(spec) == trace.trace_layers(spec).jaxpr_macs == stats.traced_macs(spec)


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
    assert (again.order, dict(again.bn), again.calls, again.jaxpr_macs) == (
        first.order, dict(first.bn), first.calls, first.jaxpr_macs)
    assert _shapes(again.abstract) == _shapes(first.abstract)
    path.write_text('{"order": [')  # unreadable: traced again and replaced
    trace.trace_layers.cache_clear()
    assert trace.trace_layers(spec).calls == first.calls
    assert path.read_text().startswith('{"order"') and len(path.read_text()) > 100
    jax.config.update('jax_compilation_cache_dir', None)
    assert trace._disk_path(spec) is None  # pylint: disable=protected-access  (cache off)
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)
    trace.trace_layers.cache_clear()


def _geometry_from_apply(spec):
  """The previous implementation: tap fractions recorded by an interceptor on model.apply."""
  consumers = {u.consumer: u.name for u in spec.units if u.consumer_kind == 'conv'}
  geo = {}

  def interceptor(next_fun, args, kwargs, ctx):
    path = '/'.join(ctx.module.path)
    if ctx.method_name == '__call__' and path in consumers and isinstance(ctx.module, nn.Conv):
      mod, shape = ctx.module, args[0].shape
      fr = [bias_lib._tap_fraction(shape[1 + a], mod.kernel_size[a], mod.strides[a],  # pylint: disable=protected-access
                                   tuple(mod.padding[a])) for a in range(2)]
      geo[consumers[path]] = np.outer(fr[0], fr[1])
    return next_fun(*args, **kwargs)

  abstract = spec.abstract_variables()
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: spec.model.apply(v, x), abstract, spec.dummy_input())
  return geo


@pytest.mark.parametrize('name', ('resnet20', 'resnet50', 'vgg16_bn_cifar'))
def test_consumer_geometry_equals_the_apply_interceptor(name):
  spec = archs.get(name)
  new = {k: v[0] for k, v in bias_lib.consumer_geometry(spec).items()}
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
  # The previous path: propagated moments, every consumer built, every constant folded.
  mom = moments.propagate(spec, variables)
  means = moments.activation_means(spec, variables, problems, moments=mom)
  cons = bias_lib.consumers(spec, variables, problems, mom)
  folded = 0
  for p, s, E, con, c in zip(problems, sols, means, cons, got):
    ref = 1.0 * (E[p.prune] - np.asarray(s.S_P, np.float64) @ E[p.keep])
    ref = bias_lib.fold_constant(con, p.prune, ref)
    np.testing.assert_array_equal(c, ref, err_msg=p.unit.name)
    folded += bool(np.any(con.tap_weight != 1.0))
  assert folded == len(problems)  # 3x3 consumers: every constant was made padding-aware
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
