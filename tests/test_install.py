"""`pip install .` (not editable) gives a working package and `vlmlab` command.

The package is installed without dependencies into a throwaway virtual environment that sees the
dependencies of the running environment through a .pth file, then imported and run from outside the
repository, so nothing can come from the source tree.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_non_editable_install(tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    site = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_paths()['purelib']
    # the running environment's packages, but not its editable vlmlab (its finder .pth is not processed)
    Path(site, '_deps.pth').write_text(deps + '\n')
    wheel_dir = tmp_path / 'wheel'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(wheel_dir),
                    str(REPO)], check=True, cwd=tmp_path)
    whl = next(wheel_dir.glob('vlmlab-*.whl'))
    # the throwaway venv's own interpreter runs pip (visible through the .pth), so scripts point at it
    subprocess.run([str(py), '-m', 'pip', 'install', '--no-deps', '-q', str(whl)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
    r = subprocess.run([str(py), '-c', 'import vlmlab, vlmlab.tokens, vlmlab.tiny, vlmlab.doctor, vlmlab.cli; print(vlmlab.__file__)'],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(venv), f'imported from {r.stdout.strip()}, not the installed package'
    exe = venv / 'bin' / 'vlmlab'
    assert exe.exists()
    r = subprocess.run([str(exe), 'doctor', '--json', '--out', str(tmp_path / 'runs')],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)['ok'] is True
