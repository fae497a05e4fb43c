"""What a new user meets first: the headline command, its errors, outputs, exports and help.

- ``python -m lbyl_jax.restore --arch resnet50`` offline with no weights anywhere: one or two
  lines on stderr naming every place looked, the file name and the URL; exit 1; no traceback.
- A typo (``--method lbly``) is refused before anything is loaded.
- ``--weights random`` runs the whole pipeline of any preset; the default output directory is
  ``runs/<arch>-<method>-r<ratio>`` and a second run gets a new name, never an overwrite; every
  phase is announced and timed; the report marks the weights as random.
- A converted checkpoint directory is accepted as ``--weights``.
- ``--export stablehlo``: the deserialized function gives the compressed model's logits;
  ``--export safetensors``: a PyTorch module of the pruned widths loads the tensors and gives the
  same logits.
- The persistent compilation cache is filled by a run, and ``--compile-cache off`` leaves it out.
- ``--help`` shows defaults and the user's flags; ``--help-all`` adds the research options.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lbyl_jax.cli import restore as cli_restore
from lbyl_jax.io import checkpoint
from lbyl_jax.io import export as export_lib
from lbyl_jax.models import archs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('LBYL_JAX_')}
  env.update(HOME=str(tmp_path / 'home'), XDG_CACHE_HOME=str(tmp_path / 'home' / '.cache'),
             PYTHONPATH=str(ROOT), LBYL_JAX_DOWNLOAD_DEADLINE='20',
             LBYL_JAX_COMPILATION_CACHE=str(tmp_path / 'jaxcache'), **extra)
  return env


def _run(args, tmp_path, *, env=None, timeout=600):
  cwd = tmp_path / 'work'
  cwd.mkdir(exist_ok=True)
  return subprocess.run([sys.executable, '-m', 'lbyl_jax.restore', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env=env or _env(tmp_path))


def test_headline_command_offline_says_where_it_looked(tmp_path):
  proc = _run(['--arch', 'resnet50', '--no-progress'], tmp_path,
              env=_env(tmp_path, http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                       HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9'))
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  errors = [ln for ln in proc.stderr.splitlines() if 'error' in ln]
  assert len(errors) == 1, proc.stderr
  line = errors[0]
  for want in ('resnet50-0676ba61.pth', 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
               '--weights', '$LBYL_JAX_WEIGHTS', 'user cache', 'torch hub cache'):
    assert want in line, (want, line)
  assert not (tmp_path / 'work' / 'runs').exists()  # nothing created by a run that failed


def test_explicit_out_gets_its_missing_parents_only_when_it_writes(tmp_path):
  proc = _run(['--arch', 'lenet_300_100', '--weights', 'missing.pth', '--out', 'a/b/run',
               '--no-progress'], tmp_path)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert not (tmp_path / 'work' / 'a').exists()  # a failed run creates nothing
  (tmp_path / 'work' / 'file').write_text('x')
  proc = _run(['--arch', 'lenet_300_100', '--weights', 'random', '--out', 'file/b/run',
               '--no-progress'], tmp_path)
  assert proc.returncode == 1 and 'is not a directory' in proc.stderr, proc.stderr
  assert '[load]' not in proc.stderr
  proc = _run(['--arch', 'lenet_300_100', '--weights', 'random', '--out', 'a/b/run',
               '--no-progress'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / 'work' / 'a' / 'b' / 'run' / 'meta.json').is_file()


def test_typo_is_refused_before_any_work(tmp_path):
  proc = _run(['--arch', 'resnet20', '--method', 'lbly', '--weights', 'random'], tmp_path)
  assert proc.returncode == 2 and "invalid choice: 'lbly'" in proc.stderr
  assert '[load]' not in proc.stderr
  proc = _run(['--arch', 'resnet20', '--nm-t', '0.2', '--weights', 'random'], tmp_path)
  assert proc.returncode == 1 and "--nm-t (nm_t) belongs to method 'nm'" in proc.stderr
  assert '[load]' not in proc.stderr and 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def random_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('first')
  procs = [_run(['--arch', 'resnet20', '--weights', 'random', '--json',
                 '--export', 'stablehlo', '--export', 'safetensors'], tmp) for _ in range(2)]
  return tmp, procs


def test_random_weights_default_out_phases(random_runs):
  tmp, (first, second) = random_runs
  assert first.returncode == 0, first.stderr
  assert second.returncode == 0, second.stderr
  runs = tmp / 'work' / 'runs'
  assert sorted(p.name for p in runs.iterdir()) == ['resnet20-lbyl-r0.3', 'resnet20-lbyl-r0.3-2']
  report = json.loads(first.stdout.strip().splitlines()[-1])
  assert report['random_weights'] is True and report['weights'] == 'random (seed 0)'
  for phase in ('load', 'compress', 'save'):
    assert f'[{phase}]' in first.stderr
    assert report['phases'][phase] > 0
  for phase in ('selection', 'delivery', 'solve', 'compile', 'bias_correction', 'surgery'):
    assert f'compress/{phase}' in report['phases']
  assert 'accuracy above is meaningless' in first.stdout or 'meaningless' in first.stderr
  on_disk = json.loads((runs / 'resnet20-lbyl-r0.3' / 'report.json').read_text())
  assert on_disk['widths'] == report['widths']


def test_compilation_cache_is_filled_and_can_be_turned_off(random_runs, tmp_path):
  tmp, _ = random_runs
  assert any((tmp / 'jaxcache').iterdir())
  proc = _run(['--arch', 'lenet_300_100', '--weights', 'random', '--compile-cache', 'off',
               '--out', str(tmp_path / 'r')], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert not (tmp_path / 'jaxcache').exists()


def test_stablehlo_export_gives_the_same_logits(random_runs):
  tmp, _ = random_runs
  run = tmp / 'work' / 'runs' / 'resnet20-lbyl-r0.3'
  loaded = checkpoint.load(run)
  exported = export_lib.load_stablehlo((run / export_lib.STABLEHLO_FILE).read_bytes())
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  want = np.asarray(loaded.apply(images))
  got = np.asarray(exported.call(images))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got5 = np.asarray(exported.call(np.concatenate([images, images[:2]])))  # any batch size
  np.testing.assert_allclose(got5[:3], want, rtol=1e-5, atol=1e-5)


def test_safetensors_export_loads_into_a_torch_model_of_the_pruned_widths(random_runs):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

  import torch_reference  # pylint: disable=import-outside-toplevel

  tmp, _ = random_runs
  run = tmp / 'work' / 'runs' / 'resnet20-lbyl-r0.3'
  loaded = checkpoint.load(run)
  model = torch_reference.build('resnet20', widths=list(loaded.widths)).eval()
  model.load_state_dict(load_file(str(run / export_lib.SAFETENSORS_FILE)), strict=True)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  want = np.asarray(loaded.model.apply(loaded.variables, x))
  with torch.no_grad():
    got = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_converted_checkpoint_directory_is_accepted_as_weights(tmp_path):
  spec = archs.get('lenet_300_100')
  checkpoint.save(tmp_path / 'converted', spec.name, None, spec.init(4))
  proc = _run(['--arch', 'lenet_300_100', '--weights', str(tmp_path / 'converted'), '--ratio',
               '0.5', '--out', str(tmp_path / 'out'), '--no-progress', '--json'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['weights'] == str(tmp_path / 'converted') and report['widths'] == [150, 50]
  proc = _run(['--arch', 'resnet20', '--weights', str(tmp_path / 'converted'), '--out',
               str(tmp_path / 'out2')], tmp_path)
  assert proc.returncode == 1 and 'is a checkpoint of lenet_300_100, not resnet20' in proc.stderr


def test_help_shows_defaults_and_hides_research_options(capsys):
  with pytest.raises(SystemExit):
    cli_restore.main(['--help'])
  short = capsys.readouterr().out
  assert '(default: lbyl)' in short and '(default: l2)' in short and '(default: 0.3)' in short
  assert '--lbyl-mode' not in short and '--guard' not in short and '--preset' not in short
  with pytest.raises(SystemExit):
    cli_restore.main(['--arch', 'resnet20', '--help-all'])
  full = capsys.readouterr().out
  for flag in ('--lbyl-mode', '--guard', '--preset', '--bias-fold', '--bnm-cov', '--a1'):
    assert flag in full
