"""`kernels/pool_real_em.py` pools pretrained AFFMAE-Base's paired differences over runs of one fine-tuning recipe;
`kernels/pair_pretrainings.py` pairs it, fine-tuned alike, from two pretrainings."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
from scipy.stats import t

ROOT = Path(__file__).resolve().parent.parent
MODELS = (('affmae_base', 'pretrained', 2e-4), ('affmae_base', 'scratch', 1e-3), ('unet', 'scratch', 1e-3))


def _run(folder, scores, lr=2e-4, seed=0, **args):
    """A run folder of one results file: one set, one draw per row of `scores` (pretrained, scratch, unet mIoU);
    `args`: more of real_em.py's arguments."""
    runs = [dict(arch=a, init=i, lr=lr if i == 'pretrained' else l, miou=v, seed=seed + k)
            for k, row in enumerate(scores) for (a, i, l), v in zip(MODELS, row)]
    folder.mkdir()
    res = dict(args=dict(head='unet', ft_steps=700, fracs='0.1', ft_seeds='0', **args), sets={'s': dict(runs=runs)})
    (folder / 'real_em_x.json').write_text(json.dumps(res))
    return folder


def _script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / 'kernels' / name), *map(str, args)],
                          capture_output=True, text=True, env={'PYTHONPATH': str(ROOT), 'PATH': ''})

_pool = lambda *args: _script('pool_real_em.py', *args)
_pair = lambda *args: _script('pair_pretrainings.py', *args)


def test_pools_the_pairs_of_every_run(tmp_path):
    rng = np.random.default_rng()
    a, b = rng.uniform(.5, .9, (2, 3)), rng.uniform(.5, .9, (1, 3))
    out = tmp_path / 'pooled.json'
    r = _pool(_run(tmp_path / 'r1', a.tolist()), _run(tmp_path / 'r2', b.tolist()), '--out', out)
    assert r.returncode == 0, r.stderr
    pooled = json.loads(out.read_text())
    assert not list(tmp_path.glob('*.part'))                # written whole, then renamed
    assert pooled['runs'] == ['r1', 'r2'] and pooled['level'] == .95
    rows = np.concatenate([a, b])
    for col, what in ((1, 'scratch'), (2, 'unet')):
        d = rows[:, 0] - rows[:, col]
        assert [p[:2] for p in pooled['pairs'][f'pretrained - {what}']['s']] == [['r1', 0], ['r1', 1], ['r2', 0]]
        s = pooled['summary'][f'pretrained - {what}']['s']
        half = t.ppf(.975, 2) * d.std(ddof=1) / np.sqrt(3)
        assert s['n'] == 3 and s['won'] == (d > 0).sum()
        np.testing.assert_allclose([s['mean'], s['ci'], s['low'], s['high']],
                                   [d.mean(), half, d.mean() - half, d.mean() + half], rtol=1e-9)


def test_bad_input_gets_one_line(tmp_path):
    out = tmp_path / 'pooled.json'
    r = _pool(_run(tmp_path / 'r1', [[.7, .6, .6]]), _run(tmp_path / 'r2', [[.7, .6, .6]], lr=1e-3), '--out', out)
    assert r.returncode == 1 and r.stderr.startswith("the runs' recipes differ") and 'Traceback' not in r.stderr
    extras = dict(loss='focal_dice'), dict(fg_crop=.5), dict(pre_image_path=True), dict(pre_stats=True)
    for i, extra in enumerate(extras):
        r = _pool(tmp_path / 'r1', _run(tmp_path / f'x{i}', [[.7, .6, .6]], **extra), '--out', out)
        assert r.returncode == 1 and r.stderr.startswith("the runs' recipes differ"), extra
    (tmp_path / 'empty').mkdir()
    r = _pool(tmp_path / 'empty', '--out', out)
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'empty'}: no real_em*.json files"
    r = _pool(tmp_path / 'r1', '--out', out, '--level', '1.5')
    assert r.returncode == 1 and r.stderr.strip() == "--level must be in (0, 1), got 1.5"
    bad = tmp_path / 'bad'; bad.mkdir()
    (bad / 'real_em_x.json').write_text('{oops')
    r = _pool(bad, '--out', out)
    assert r.returncode == 1 and r.stderr.startswith(f"{bad / 'real_em_x.json'}: not a results file (")
    (bad / 'real_em_x.json').write_text('{"sets": {}}')
    r = _pool(bad, '--out', out)
    assert r.returncode == 1 and r.stderr.strip() == f"{bad}: not kernels/real_em.py results (no 'args')"
    assert not out.exists()


def _pre_run(folder, scores, frac=.1, target='hog', lr=2e-4, **args):
    "A run folder of one results file: one set, one draw per score of pretrained AFFMAE-Base (and a U-Net beside it)."
    runs = [r for k, v in enumerate(scores) for r in (
        dict(arch='affmae_base', init='pretrained', lr=lr, miou=v, seed=k, label_frac=frac),
        dict(arch='unet', init='scratch', lr=1e-3, miou=.5, seed=k, label_frac=frac))]
    folder.mkdir()
    res = dict(args=dict(head='unet', ft_steps=700, **args), pretrained_in=dict(args=dict(pre_target=target)),
               sets={'s': dict(runs=runs)})
    (folder / 'real_em_x.json').write_text(json.dumps(res))
    return folder


def test_pairs_by_set_fraction_and_draw(tmp_path):
    rng = np.random.default_rng()
    a10, a100, b10, b100 = rng.uniform(.5, .9, 3).tolist(), rng.uniform(.5, .9, 2).tolist(), \
        rng.uniform(.5, .9, 2).tolist(), rng.uniform(.5, .9, 2).tolist()
    out = tmp_path / 'pairs.json'
    r = _pair(_pre_run(tmp_path / 'a10', a10), _pre_run(tmp_path / 'a100', a100, 1.), '--against',
              _pre_run(tmp_path / 'b10', b10, target='pixels'), _pre_run(tmp_path / 'b100', b100, 1., target='pixels'),
              '--out', out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert not list(tmp_path.glob('*.part'))                          # written whole, then renamed
    assert [p[:2] for p in res['pairs']['s']] == [[.1, 0], [.1, 1], [1., 0], [1., 1]]   # a10's third draw: unpaired
    d = np.array(a10[:2] + a100) - np.array(b10 + b100)
    s, half = res['summary']['s'], t.ppf(.975, 3) * d.std(ddof=1) / 2
    assert s['n'] == 4 and s['won'] == (d > 0).sum()
    np.testing.assert_allclose([s['mean'], s['ci']], [d.mean(), half], rtol=1e-9)
    assert [p['pre_target'] for p in res['pretraining']['runs'] + res['pretraining']['against']] == ['hog'] * 2 + \
        ['pixels'] * 2 and res['finetuning']['lr'] == [2e-4]


def test_pair_bad_input_gets_one_line(tmp_path):
    out = tmp_path / 'pairs.json'
    a, b = _pre_run(tmp_path / 'a', [.7]), _pre_run(tmp_path / 'b', [.6], lr=1e-3)
    r = _pair(a, '--against', b, '--out', out)
    assert r.returncode == 1 and r.stderr.startswith("the runs' fine-tuning differs") and 'Traceback' not in r.stderr
    r = _pair(a, '--against', _pre_run(tmp_path / 'c', [.6], frac=1.), '--out', out)
    assert r.returncode == 1
    assert r.stderr.strip() == "no set, label fraction and draw holds a pretrained run on both sides"
    (tmp_path / 'empty').mkdir()
    r = _pair(a, '--against', tmp_path / 'empty', '--out', out)
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'empty'}: no real_em*.json files"
    r = _pair(a, '--against', a, '--out', out, '--level', '0')
    assert r.returncode == 1 and r.stderr.strip() == "--level must be in (0, 1), got 0.0"
    assert not out.exists()
