"""``--overwrite`` never destroys what is not ours; the old / new swap survives a kill.

Covers :mod:`lbyl_jax.io.publish` directly, through ``checkpoint.save`` and through the restore CLI
(an empty ``--out``, ``.``, the home directory, a root, a regular file, a symlink and a foreign
directory are refused and left untouched), and kills a writer (SIGKILL) before its marker, between
the two renames of a swap, and after its marker, checking that the next writer of the same
``--out`` finds the old or the new result complete and cleans the dead staging directories.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lbyl_jax.io import checkpoint
from lbyl_jax.io import publish

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree_state(path: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b'<dir>')
          for p in sorted(path.rglob('*'))}


def _lenet_vars():
  from lbyl_jax.models import archs  # pylint: disable=import-outside-toplevel

  return archs.get('lenet_300_100').init(0)


def _make_ours(path: pathlib.Path, kind: str = 'sweep', text: str = 'old') -> None:
  with publish.staging_dir(path, kind=kind, overwrite=path.exists()) as tmp:
    (tmp / 'result.txt').write_text(text)


# --------------------------------------------------------------------------------------------
# What may be replaced.


def test_refuses_empty_dot_home_root_and_cwd_parents(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'precious.txt').write_text('keep')
  before = _tree_state(tmp_path)
  for out in ('', '   ', '.', '..', str(tmp_path), '/', str(tmp_path.parent)):
    with pytest.raises(publish.UnsafeOutputError):
      publish.check_target(out, overwrite=True)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  (tmp_path / 'home').mkdir()
  with pytest.raises(publish.UnsafeOutputError, match='home directory'):
    publish.check_target(tmp_path / 'home', overwrite=True)
  assert _tree_state(tmp_path) == {**before, 'home': b'<dir>'}


def test_missing_parents_are_checked_not_created(tmp_path):
  target = tmp_path / 'a' / 'b' / 'run'
  with pytest.raises(FileNotFoundError, match='parent directory .* does not exist'):
    publish.check_target(target, overwrite=False)
  assert publish.check_target(target, overwrite=False, create_parents=True) == target
  assert not (tmp_path / 'a').exists()
  (tmp_path / 'f').write_text('x')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    publish.check_target(tmp_path / 'f' / 'b' / 'run', overwrite=False, create_parents=True)
  publish.make_parents(target)
  assert target.parent.is_dir() and not target.exists()


def test_refuses_files_symlinks_and_foreign_directories(tmp_path):
  f = tmp_path / 'file.bin'
  f.write_bytes(b'data')
  foreign = tmp_path / 'photos'
  foreign.mkdir()
  (foreign / 'a.jpg').write_bytes(b'jpeg')
  (foreign / 'meta.json').write_text('{"not": "ours"}')
  ours = tmp_path / 'run'
  _make_ours(ours)
  link = tmp_path / 'link'
  link.symlink_to(ours)
  before = _tree_state(tmp_path)
  with pytest.raises(publish.UnsafeOutputError, match='is a file'):
    publish.check_target(f, overwrite=True)
  with pytest.raises(publish.UnsafeOutputError, match='not a directory this tool wrote'):
    publish.check_target(foreign, overwrite=True)
  with pytest.raises(publish.UnsafeOutputError, match='symbolic link'):
    publish.check_target(link, overwrite=True)
  with pytest.raises(FileExistsError, match='--overwrite'):
    publish.check_target(ours, overwrite=False)
  with pytest.raises(publish.UnsafeOutputError):
    checkpoint.save(foreign, 'lenet_300_100', None, _lenet_vars(), overwrite=True)
  assert _tree_state(tmp_path) == before
  assert publish.check_target(ours, overwrite=True) == ours


def test_overwrite_replaces_our_checkpoint_sweep_and_a_legacy_checkpoint(tmp_path):
  variables = _lenet_vars()
  ck = checkpoint.save(tmp_path / 'ck', 'lenet_300_100', None, variables, meta={'run': 1})
  assert publish.read_marker(ck)['kind'] == 'checkpoint'
  checkpoint.save(ck, 'lenet_300_100', None, variables, meta={'run': 2}, overwrite=True)
  assert checkpoint.read_meta(ck)['run'] == 2
  # A checkpoint written before the marker existed is still recognized.
  (ck / publish.MARKER).unlink()
  assert publish.is_ours(ck)
  checkpoint.save(ck, 'lenet_300_100', None, variables, meta={'run': 3}, overwrite=True)
  assert checkpoint.read_meta(ck)['run'] == 3
  sweep = tmp_path / 'sweep'
  _make_ours(sweep, 'sweep', 'one')
  _make_ours(sweep, 'sweep', 'two')
  assert (sweep / 'result.txt').read_text() == 'two'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ck', 'sweep']  # nothing left behind


def test_a_failed_write_leaves_the_old_result_and_no_staging(tmp_path):
  out = tmp_path / 'run'
  _make_ours(out, text='old')
  with pytest.raises(RuntimeError, match='boom'):
    with publish.staging_dir(out, kind='sweep', overwrite=True) as tmp:
      (tmp / 'result.txt').write_text('new')
      raise RuntimeError('boom')
  assert (out / 'result.txt').read_text() == 'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


def test_cli_refuses_empty_out_before_any_work(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'precious.txt').write_text('keep')
  before = _tree_state(tmp_path)
  proc = subprocess.run(
      [sys.executable, '-m', 'lbyl_jax.restore', '--arch', 'lenet_300_100', '--weights',
       str(tmp_path / 'missing.pth'), '--out', '', '--overwrite', '--no-download'],
      capture_output=True, text=True, timeout=120, cwd=tmp_path,
      env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode != 0
  assert '--out is empty' in proc.stderr
  assert _tree_state(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Kills.

_CHILD = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from lbyl_jax.io import publish
    out, text, when = sys.argv[1], sys.argv[2], sys.argv[3]
    real_rename = os.rename
    calls = []

    def rename(a, b):
      real_rename(a, b)
      calls.append((a, b))
      if when == 'between_renames' and len(calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)

    def marker(staging, kind, _real=publish._write_marker):
      _real(staging, kind)
      if when == 'after_marker':
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename
    publish._write_marker = marker
    with publish.staging_dir(out, kind='sweep', overwrite=True) as tmp:
      with open(os.path.join(tmp, 'result.txt'), 'w') as f:
        f.write(text)
      if when == 'before_marker':
        os.kill(os.getpid(), signal.SIGKILL)
''')


def _killed_writer(tmp_path, out, text, when):
  script = tmp_path / 'child.py'
  script.write_text(_CHILD.format(root=str(ROOT)))
  proc = subprocess.run([sys.executable, str(script), str(out), text, when], timeout=60)
  assert proc.returncode == -9  # SIGKILL


@pytest.mark.parametrize('when, expect', [
    ('before_marker', 'old'),       # the new result never completed: the old one stays
    ('after_marker', 'old'),        # complete but not swapped: the old one stays, staging removed
    ('between_renames', 'new'),     # old moved away, new complete: the next run finishes the swap
])
def test_kill_during_save_leaves_old_or_new_complete(tmp_path, when, expect):
  out = tmp_path / 'run'
  _make_ours(out, text='old')
  _killed_writer(tmp_path, out, 'new', when)
  leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.run.'))
  assert leftovers  # the kill left a staging and / or an old directory behind
  # The next writer of the same --out recovers first, then refuses without --overwrite.
  with pytest.raises(FileExistsError):
    with publish.staging_dir(out, kind='sweep', overwrite=False):
      pass
  assert (out / 'result.txt').read_text() == expect
  assert publish.read_marker(out) is not None
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.run.')]


def test_kill_of_a_first_write_between_marker_and_rename_is_finished(tmp_path):
  out = tmp_path / 'fresh'
  _killed_writer(tmp_path, out, 'new', 'after_marker')
  assert not out.exists()
  assert publish.recover(out) == 'finished'
  assert (out / 'result.txt').read_text() == 'new'


def test_staging_of_a_live_writer_is_left_alone(tmp_path):
  out = tmp_path / 'run'
  live = tmp_path / '.run.tmp-live'
  live.mkdir()
  (live / '.owner.json').write_text(json.dumps(dict(pid=os.getppid(), host=os.uname().nodename)))
  dead = tmp_path / '.run.tmp-dead'
  dead.mkdir()
  (dead / '.owner.json').write_text(json.dumps(dict(pid=2**22 + 12345, host=os.uname().nodename)))
  assert publish.recover(out) is None
  assert live.exists() and not dead.exists()


def test_marker_is_written_last_and_only_on_success(tmp_path):
  out = tmp_path / 'run'
  with publish.staging_dir(out, kind='checkpoint') as tmp:
    assert not (tmp / publish.MARKER).exists()
    (tmp / 'x').write_bytes(np.arange(3).tobytes())
  info = publish.read_marker(out)
  assert info['kind'] == 'checkpoint' and info['complete'] is True
  assert not (out / '.owner.json').exists()
