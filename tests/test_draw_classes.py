"`kernels/draw_classes.py` records the images and class shares of each fine-tuning draw of `kernels/real_em.py`."
import json, random, subprocess, sys
from pathlib import Path
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _set(root, n=10, classes=('background', 'gbm')):
    "A kidney-gbm-shaped set of `n` random 32² training tiles with random masks; returns each tile's class counts."
    d = root / 'kidney-gbm'
    (d / 'train' / 'images').mkdir(parents=True); (d / 'train' / 'masks').mkdir()
    (d / 'classes.txt').write_text('\n'.join(classes) + '\n')
    rng, counts = np.random.default_rng(), []
    for i in range(n):
        m = (rng.random((32, 32)) < rng.uniform(.05, .5)).astype(np.uint8)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(d / 'train' / 'images' / f't{i:02}.png')
        Image.fromarray(m).save(d / 'train' / 'masks' / f't{i:02}.png')
        counts.append(np.bincount(m.ravel(), minlength=len(classes)))
    return counts


def _draws(*args):
    return subprocess.run([sys.executable, str(ROOT / 'kernels' / 'draw_classes.py'), *map(str, args)],
                          capture_output=True, text=True, env={'PYTHONPATH': str(ROOT), 'PATH': ''})


def test_each_draw_is_label_subsets_with_its_class_shares(tmp_path):
    counts = _set(tmp_path / 'data')
    out = tmp_path / 'draws.json'
    seeds = random.sample(range(100), 2)
    r = _draws('--data', tmp_path / 'data', '--sets', 'kidney-gbm', '--fracs', '0.2,1', '--seeds',
               ','.join(map(str, seeds)), '--crops', 40, '--size', 8, '--fg-crops', '0,1', '--out', out)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob('*.part'))                 # written whole, then renamed
    got = json.loads(out.read_text())['sets']['kidney-gbm']
    assert got['n_train'] == 10 and [(d['label_frac'], d['seed']) for d in got['draws']] == \
        [(f, s) for f in (.2, 1.) for s in seeds]
    for d in got['draws']:
        ids = sorted(random.Random(d['seed']).sample(range(10), round(d['label_frac'] * 10)))   # label_subset's draw
        assert d['images'] == [f't{i:02}.png' for i in ids]
        c = sum(counts[i] for i in ids)
        np.testing.assert_allclose(list(d['share'].values()), c / c.sum(), atol=1e-6)
        assert d['crops_holding']['1'][1] == 1. and 0 < d['crops_holding']['0'][1] <= 1   # placed: all hold class 1


def test_bad_input_gets_one_line(tmp_path):
    out = tmp_path / 'draws.json'
    r = _draws('--data', tmp_path, '--sets', 'kidney-gbm', '--out', out)
    assert r.returncode == 1
    assert r.stderr.strip() == f"{tmp_path / 'kidney-gbm'}: no classes.txt (is --data the sets' root?)"
    r = _draws('--data', tmp_path, '--sets', 'other', '--out', out)
    assert r.returncode == 1 and r.stderr.startswith('unknown set(s) other: known: ')
    r = _draws('--data', tmp_path, '--fracs', '0', '--out', out)
    assert r.returncode == 1 and r.stderr.strip() == '--fracs must lie in (0, 1], got 0'
    r = _draws('--data', tmp_path, '--fg-crops', '0,2', '--out', out)
    assert r.returncode == 1 and r.stderr.strip() == '--fg-crops must lie in [0, 1], got 0,2'
    _set(tmp_path / 'data', n=3)
    bad = tmp_path / 'data' / 'kidney-gbm' / 'train' / 'masks' / 't01.png'
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(bad)
    r = _draws('--data', tmp_path / 'data', '--sets', 'kidney-gbm', '--fracs', '1', '--size', 16, '--out', out)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 't01' in r.stderr, r.stderr
    assert not out.exists()
