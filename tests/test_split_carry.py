"`kernels/split_carry.py` splits a data folder into parts that fit a device call; `session_real_em.sh` merges them."
import importlib.util, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('split_carry', ROOT / 'kernels' / 'split_carry.py')
sc = importlib.util.module_from_spec(spec); spec.loader.exec_module(sc)


def _folder(root, sizes):
    "A data folder of files with the given sizes, in two subfolders, random bytes."
    d = root / 'data_em_x'
    for i, n in enumerate(sizes):
        f = d / 'set' / ('images' if i % 2 else 'masks') / f'{i:02d}.png'
        f.parent.mkdir(parents=True, exist_ok=True); f.write_bytes(bytes(range(256)) * (n // 256) + b'x' * (n % 256))
    (d / 'set' / 'classes.txt').write_text('background\nfg\n')
    return d


def _contents(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob('*') if p.is_file()}


def test_split_then_merge(tmp_path):
    d = _folder(tmp_path, [3000, 2500, 2000, 1800, 1200, 900, 700, 300])
    parts = sc.split(d, room=4000)
    assert len(parts) >= 4 and all(sc.size(p) <= 4000 for p in parts)
    merged = {}
    for p in parts:
        c = _contents(p); assert not set(c) & set(merged); merged |= c          # each file in exactly one part
    assert merged == _contents(d)
    assert sc.split(d, room=10**6) == [] and not list(tmp_path.glob('data_em_x_p*'))   # fits: old parts removed
    parts = sc.split(d, room=4000)
    # the session script's merge, run on a machine that holds the parts alone
    script = (ROOT / 'kernels' / 'session_real_em.sh').read_text()
    merge = re.search(r'^for part in .*?^done\n.*?^done$', script, re.S | re.M).group()   # parts, then chunks
    device = tmp_path / 'device'; device.mkdir()
    for p in parts: subprocess.run(['cp', '-r', str(p), str(device)], check=True)
    subprocess.run(['bash', '-c', merge], cwd=device, check=True)
    assert _contents(device / 'data_em_x') == _contents(d)


def _merge_on_device(tmp_path, parts, upto=None):
    "The session script's merge on a machine that has received `parts[:upto]` (one a call) and holds nothing else."
    script = (ROOT / 'kernels' / 'session_real_em.sh').read_text()
    merge = re.search(r'^for part in .*?^done\n.*?^done$', script, re.S | re.M).group()
    device = tmp_path / 'device'; device.mkdir(exist_ok=True)
    for p in parts[:upto]: subprocess.run(['cp', '-r', str(p), str(device)], check=True)
    subprocess.run(['bash', '-c', merge], cwd=device, check=True)
    return device / 'data_em_x'


def test_file_larger_than_a_call(tmp_path):
    d = _folder(tmp_path, [9000, 100])
    parts = sc.split(d, room=4000)
    names = sorted(str(f.relative_to(p)) for p in parts for f in p.rglob('*.png*'))
    assert names == ['set/images/01.png'] + [f'set/masks/00.png.part{j}of3' for j in (1, 2, 3)], names
    assert all(sc.size(p) <= 4000 for p in parts)
    got = _merge_on_device(tmp_path, parts, upto=len(parts) - 1)     # a chunk still to come: nothing merged yet
    assert not (got / 'set' / 'masks' / '00.png').exists() and len(list(got.rglob('*.part*'))) >= 1
    got = _merge_on_device(tmp_path, parts)                          # all come: the file, and no chunk left
    assert _contents(got) == _contents(d)
    got = _merge_on_device(tmp_path, parts)                          # the next call: the parts copied in again
    assert _contents(got) == _contents(d)


def test_cli(tmp_path):
    d = _folder(tmp_path, [3000, 2500, 2000])
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / 'kernels' / 'split_carry.py'), *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run('data_em_x', '--room-mib', str(4000 / 2**20))
    assert r.returncode == 0 and r.stdout.count('carry data_em_x_p') >= 2, r.stdout + r.stderr
    r = run('nope')
    assert r.returncode != 0 and 'nope: no such folder' in r.stderr
