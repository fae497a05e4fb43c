"""The README's commands and snippet are executed, so they cannot drift from the code.

- The first block (the two lines a new user runs): its install and test commands are exactly what
  ``.ci/run`` does; its main job runs as written, offline, with ``$LBYL_JAX_WEIGHTS`` /
  ``$LBYL_JAX_DATA`` pointing at ../shared (as the README says to do offline), on 500 images.
- Every command of the "Using it" block runs in order (later ones read what earlier ones wrote)
  from a directory that has ../shared beside it, with ``--limit`` on the commands that evaluate.
- The Python snippets (a preset; the user's own Flax model) run as written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.realdata

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text(encoding='utf-8')
LIMIT = '300'


def blocks(lang: str) -> list[str]:
  return re.findall(rf'```{lang}\n(.*?)```', README, flags=re.S)


def commands(block: str) -> list[str]:
  """Shell commands of a block: comments dropped, backslash continuations joined."""
  text = re.sub(r'\\\n\s*', ' ', block)
  out = []
  for line in text.splitlines():
    line = line.split('  #')[0].strip() if not line.lstrip().startswith('#') else ''
    if line:
      out.append(line)
  return out


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, shared):
  """tmp/work with tmp/shared -> the real shared directory, so '../shared/...' resolves."""
  base = tmp_path_factory.mktemp('readme')
  (base / 'shared').symlink_to(shared)
  (base / 'work').mkdir()
  return base / 'work'


def _run(argv: list[str], cwd: pathlib.Path, env: dict | None = None, timeout: int = 600):
  proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})})
  assert proc.returncode == 0, f'{shlex.join(argv)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}'
  return proc


def test_first_lines_are_the_ci_install_and_the_main_job(workdir, shared):
  first = commands(blocks('bash')[0])
  assert len(first) == 2
  install, main_job = (part.strip() for part in first[0].split('&&'))
  test_install, test_cmd = (part.strip() for part in first[1].split('&&'))
  ci = (ROOT / '.ci' / 'run').read_text()
  ci_install = re.search(r'^pip install .*$', ci, flags=re.M).group(0)
  assert shlex.split(ci_install.replace(' -q', '')) == shlex.split(test_install)
  assert re.search(r'^python -m pytest -q$', ci, flags=re.M) and test_cmd == 'python -m pytest -q'
  assert install == 'pip install -e .'
  argv = shlex.split(main_job)
  assert argv[:3] == ['python', '-m', 'lbyl_jax.restore']
  proc = _run([sys.executable, *argv[1:], '--limit', '500', '--no-progress', '--json'], workdir,
              env={'LBYL_JAX_WEIGHTS': str(shared / 'weights'),
                   'LBYL_JAX_DATA': str(shared / 'data'),
                   'LBYL_JAX_CACHE': str(workdir / 'cache')})
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['arch'] == 'resnet20' and report['method'] == 'lbyl' and report['ratio'] == 0.3
  assert report['n_eval'] == 500 and report['top1_after'] > 50  # real weights, real data
  assert (workdir / 'runs' / 'resnet20-lbyl-r0.3' / 'meta.json').is_file()


def test_usage_block_runs_in_order(workdir):
  usage = commands(blocks('bash')[1])
  assert len(usage) >= 6
  for cmd in usage:
    argv = shlex.split(cmd)
    assert argv[:2] == ['python', '-m'], cmd
    if '--data' in argv:
      argv += ['--limit', LIMIT]
    argv += ['--no-progress'] if argv[2] != 'lbyl_jax.convert' else []
    _run([sys.executable, *argv[1:]], workdir)
  runs = workdir / 'runs'
  for name in ('nm56_lbyl30', 'nm56_udfc_w4', 'r20_sweep', 'resnet56_flax'):
    assert (runs / name).is_dir(), name
  assert (runs / 'nm56_udfc_w4' / 'model.stablehlo').is_file()
  assert (runs / 'nm56_udfc_w4' / 'model.safetensors').is_file()
  assert json.loads((runs / 'nm56_lbyl30' / 'report.json').read_text())['data_slice'] == [5000, 10000]


def test_python_snippets_run(workdir, capsys):
  preset, user_model = blocks('python')
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    exec(compile(preset, 'README.md', 'exec'), {})  # pylint: disable=exec-used
    assert (workdir / 'runs' / 'r20_api' / 'meta.json').is_file()
    capsys.readouterr()
    exec(compile(user_model, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  out = capsys.readouterr().out
  assert '2 prunable units' in out and 'Dense_0: reaches the network output' in out, out
  assert "('Conv_0', 24, 3)" in out, out  # 25 % of 32 channels removed
