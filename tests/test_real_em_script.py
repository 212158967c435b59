"`kernels/real_em.py --tiny` end to end on small synthetic stand-ins of the real sets: the GPU session's two phases."
import json, subprocess, sys
from pathlib import Path
import numpy as np
from PIL import Image
from affmae.synth import synth_em

ROOT = Path(__file__).resolve().parent.parent
SETS = {'drosophila-vnc': (('.', 6),), 'sbem-mito': (('training', 3), ('validation', 2)),
        'kidney-gbm': (('train', 3), ('test', 2))}
CLASSES = {'drosophila-vnc': 'intracellular membrane mitochondria synapse glia_extracellular',
           'sbem-mito': 'background mitochondria', 'kidney-gbm': 'background gbm'}


def _png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(a).save(path)


def _fake_sets(root, size=112):
    "The layout of `../shared/data` for the three labelled sets (synthetic EM) and one unlabelled image."
    seed = 0
    for name, splits in SETS.items():
        (root / name).mkdir(parents=True)
        (root / name / 'classes.txt').write_text('\n'.join(CLASSES[name].split()) + '\n')
        for split, n in splits:
            for i in range(n):
                img, lbl = (t.numpy() for t in synth_em(size + 16 * (i % 2), seed=seed)); seed += 1
                lbl = lbl if name == 'drosophila-vnc' else (lbl == 2).astype(np.uint8)
                _png(root / name / split / 'images' / f'{name[:3]}{i:02d}.png', (img * 255).astype(np.uint8))
                _png(root / name / split / 'masks' / f'{name[:3]}{i:02d}.png', lbl.astype(np.uint8))
    _png(root / 'sbem-mito' / 'unlabelled' / 'u00.png', (synth_em(size, seed=99)[0].numpy() * 255).astype(np.uint8))


def _run(*args, timeout=900, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / 'kernels' / 'real_em.py'), '--tiny', *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore',
                            'PATH': '/usr/bin:/bin', 'HOME': str(Path.home())})
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_pretrain_then_finetune(tmp_path):
    data, pre, out1, out2 = (tmp_path / d for d in ('data', 'pre', 'out1', 'out2'))
    _fake_sets(data)
    err = _run('--data', data, '--out', out1, '--archs', 'vitmae_tiny', ok=False)    # fine-tuning: affmae first
    assert 'error: --archs vitmae_tiny: one or both of affmae_tiny, vitmae_tiny; fine-tuning needs affmae' in err, err
    assert '--compare-steps must be >= 1, got 0' in _run('--data', data, '--out', out1, '--compare-steps', 0, ok=False)
    assert '--compare-head-lr must be positive' in _run('--data', data, '--out', out1, '--compare-head-lr', 0, ok=False)
    assert '--compare-aux must be positive' in _run('--data', data, '--out', out1, '--compare-aux', -1, ok=False)
    err = _run('--data', data, '--out', out1, '--compare-path-drop', 1, ok=False)
    assert '--compare-path-drop must be in (0, 1), with an image path' in err, err
    err = _run('--data', data, '--out', out1, '--head', 'pyramid', '--compare-zero-fuse', ok=False)
    assert '--compare-zero-fuse needs --head unet' in err, err
    err = _run('--data', data, '--out', out1, '--pre-stats', '--compare-pre-stats', ok=False)
    assert '--compare-pre-stats beside --pre-stats compares a run with itself' in err, err
    err = _run('--data', data, '--out', out1, '--compare-lr-decay', 0, ok=False)
    assert '--compare-lr-decay must be in (0, 1] (1: no decay), got 0.0' in err, err
    err = _run('--data', data, '--out', out1, '--compare-lr-decay', .75, ok=False)
    assert '--compare-lr-decay 0.75 is --lr-decay: nothing to compare' in err, err
    err = _run('--data', data, '--out', out1, '--pre-unlabelled', 'kidney-gbm', ok=False)
    assert '--pre-unlabelled kidney-gbm: no unlabelled images' in err, err
    err = _run('--data', data, '--out', out1, '--pre-sets', '', '--pre-unlabelled', '', ok=False)
    assert 'nothing to pretrain on' in err, err
    _run('--data', data, '--out', out1, '--pretrain-only', '--archs', 'affmae_tiny', '--sets', 'sbem-mito',
         '--pre-sets', 'sbem-mito', '--pre-unlabelled', 'sbem-mito')               # one set's own images alone
    assert json.loads((out1 / 'real_em.json').read_text())['pretrain_data'] == ['sbem-mito/train/images',
                                                                               'unlabelled/sbem-mito']
    for arch, aug in (('affmae_tiny', 'full'), ('vitmae_tiny', 'flips')):   # one arch a call, as a short budget does
        _run('--data', data, '--out', out1, '--pretrain-only', '--save-pretrained', pre, '--archs', arch,
             '--pre-augment', aug)
    saved = json.loads((pre / 'pretrain.json').read_text())
    assert sorted(saved['pretrain']) == ['affmae_tiny', 'vitmae_tiny']
    for arch in ('affmae_tiny', 'vitmae_tiny'):
        assert (pre / f'{arch}.pt').is_file()
        p = saved['pretrain'][arch]
        assert p['balance'] == 'area' and abs(sum(p['mix'].values()) - 1) < 1e-6, p['mix']
        assert p['augment'] == ('full' if arch == 'affmae_tiny' else 'flips')
        assert 'unlabelled/podocyte-tem' in p['mix'] and 'unlabelled/sbem-mito' in p['mix']
    _run('--data', data, '--sets', ','.join(SETS), '--out', out2, '--load-pretrained', pre,
         '--fracs', '0.5', '--ft-steps', 6, '--skip', 'vitmae_tiny:scratch', '--head', 'unet',
         '--compare-head', 'pyramid', '--compare-head-first', 2, '--compare-steps', 3, '--compare-head-lr', 5e-3,
         '--compare-head-alone', '--compare-zero-fuse', '--compare-aux', .4,
         '--compare-path-drop', .5, '--compare-pre-stats', '--budget', 3600)   # steps are fixed: no run cut for time
    res = json.loads((out2 / 'real_em.json').read_text())
    assert res['timing']['unet_loop_step_s'] > 0 and res['timing']['unet_loop_fixed_s'] >= 0
    for name in SETS:
        runs = res['sets'][name]['runs']
        got = sorted((r['arch'], r['init'], r.get('variant') or '') for r in runs)
        assert got == sorted([('affmae_tiny', 'pretrained', ''), ('affmae_tiny', 'scratch', ''),
                              ('vitmae_tiny', 'pretrained', ''), ('unet', 'scratch', ''),
                              ('affmae_tiny', 'pretrained', 'pyramid head'),
                              ('affmae_tiny', 'pretrained', 'head first 2'),
                              ('vitmae_tiny', 'pretrained', 'head first 2'),
                              ('affmae_tiny', 'pretrained', 'head lr 0.005'),
                              ('vitmae_tiny', 'pretrained', 'head lr 0.005'),
                              ('affmae_tiny', 'pretrained', '3 steps'),
                              ('affmae_tiny', 'scratch', 'head alone'),
                              ('affmae_tiny', 'pretrained', 'zero fuse'),
                              ('affmae_tiny', 'pretrained', 'aux 0.4'), ('affmae_tiny', 'scratch', 'aux 0.4'),
                              ('affmae_tiny', 'pretrained', 'path drop 0.5'),
                              ('affmae_tiny', 'scratch', 'path drop 0.5'),
                              ('affmae_tiny', 'pretrained', 'pretraining stats'),
                              ('vitmae_tiny', 'pretrained', 'pretraining stats')]), got
        by_pre = {r['arch']: r['stats'] for r in runs if 'stats' in r}        # only the variant, as pretrained
        assert len(res['sets'][name]['stats']) == 2 and res['sets'][name]['stats'] not in by_pre.values()
        assert by_pre == {x: saved['pretrain'][x]['stats'] for x in ('affmae_tiny', 'vitmae_tiny')}, by_pre
        assert all(r.get('variant') == 'pretraining stats' for r in runs if 'stats' in r)
        assert [r.get('head_path_drop') for r in runs if r.get('variant') == 'path drop 0.5'] == [.5, .5]
        assert [r.get('aux_weight') for r in runs if r.get('variant') == 'aux 0.4'] == [.4, .4]
        assert [r.get('head_lr') for r in runs if r.get('variant') == 'head lr 0.005'] == [5e-3, 5e-3]
        assert all('head_lr' not in r for r in runs if r.get('variant') != 'head lr 0.005')
        assert {r['steps'] for r in runs if r.get('variant') == '3 steps'} == {3}
        assert all(0 <= r['miou'] <= 1 for r in runs)
        assert {r['head'] for r in runs if r['arch'] != 'unet'} == {'unet', 'pyramid'}
        unet = next(r for r in runs if r['arch'] == 'unet')
        assert unet['matched_to_s'] > 0 and unet['steps'] >= 10
    assert {f.name for f in out2.iterdir()} >= {'real_em.json', 'examples.png', 'scores.png'}
    again = ('--data', data, '--sets', 'sbem-mito', '--load-pretrained', pre, '--archs', 'affmae_tiny',
             '--fracs', '0.5', '--ft-steps', 4, '--compare-head', '', '--pre-head-lr', 1e-3,   # ViT-MAE left out
             '--compare-lr-decay', 1, '--compare-fresh-decoder')
    _run(*again, '--out', out1)
    runs = json.loads((out1 / 'real_em.json').read_text())['sets']['sbem-mito']['runs']
    _run(*again, '--out', out2)                              # the same command again: every transformer run scores
    rerun = json.loads((out2 / 'real_em.json').read_text())['sets']['sbem-mito']['runs']   # the same (the U-Net's
    score = lambda rs: {(r['arch'], r['init'], r.get('variant')): r['miou'] for r in rs if r['arch'] != 'unet'}
    assert score(rerun) == score(runs), (score(rerun), score(runs))             # steps follow the clock)
    got = sorted((r['arch'], r['init'], r.get('head_lr', 0), r.get('lr_decay', 0), r.get('variant', '')) for r in runs)
    assert got == [('affmae_tiny', 'pretrained', 1e-3, 0, ''), ('affmae_tiny', 'pretrained', 1e-3, 0, 'fresh decoder'),
                   ('affmae_tiny', 'pretrained', 1e-3, 1, 'lr decay 1'),
                   ('affmae_tiny', 'scratch', 0, 0, ''), ('unet', 'scratch', 0, 0, '')], got


def test_clahe_copies(tmp_path):
    "`prep_data_em.py --clahe` records how it made a copy; `real_em.py` records that and refuses mixing it with plain."
    data, eq, out = tmp_path / 'data', tmp_path / 'eq', tmp_path / 'out'
    _fake_sets(data)
    subprocess.run([sys.executable, str(ROOT / 'kernels' / 'prep_data_em.py'), data, eq, '--max', '96', '--skip', '',
                    '--clahe'], check=True, cwd=ROOT, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
    prep = json.loads((eq / 'prep.json').read_text())
    assert prep['clahe'] == {'clip': 4., 'tiles': 8} and prep['max'] == 96
    img = lambda root: np.asarray(Image.open(root / 'kidney-gbm' / 'test' / 'images' / 'kid00.png'))
    msk = lambda root: np.asarray(Image.open(root / 'kidney-gbm' / 'test' / 'masks' / 'kid00.png'))
    assert img(eq).shape == (96, 96) and not np.array_equal(img(eq), img(data)[8:104, 8:104])   # equalised
    np.testing.assert_array_equal(msk(eq), msk(data)[8:104, 8:104])                             # masks only cut
    err = _run('--data', f'{eq},{data}', '--out', out, '--classes-only', ok=False)
    assert '--data mixes CLAHE-equalised and plain copies' in err, err
    err = _run('--data', eq, '--out', out, '--classes-only', ok=False)          # the shipped podocytes are plain
    assert 'podocyte-tem: the shipped copy is not CLAHE-equalised like --data' in err, err
    _run('--data', eq, '--out', out, '--classes-only', '--pre-unlabelled', 'sbem-mito')
    assert json.loads((out / 'real_em.json').read_text())['data_prep'] == {str(eq): {'.': prep}}


def test_pre_share_and_compare_pretrained(tmp_path):
    """`--pre-share`: pretraining on a seeded share of each folder's slices, the fine-tuning splits left whole;
    `--compare-pretrained`: that pretraining fine-tuned beside another on the same draws."""
    data, out, half, whole = (tmp_path / d for d in ('data', 'out', 'half', 'whole'))
    _fake_sets(data)
    assert '--pre-share must be in (0, 1], got 0.0' in _run('--data', data, '--out', out, '--pre-share', 0, ok=False)
    err = _run('--data', data, '--out', out, '--pre-share', .5, '--load-pretrained', tmp_path, ok=False)
    assert '--pre-share chooses pretraining images; --load-pretrained pretrains nothing' in err, err
    pre_args = ('--pretrain-only', '--archs', 'affmae_tiny', '--pre-sets', 'drosophila-vnc,sbem-mito',
                '--pre-unlabelled', 'podocyte-tem')
    _run('--data', data, '--out', out, *pre_args, '--pre-share', .5, '--save-pretrained', half)
    res = json.loads((out / 'real_em.json').read_text())
    share = res['pre_share_slices']           # --tiny: 2 and 3 training images, the first 2 podocyte images
    assert share == {'drosophila-vnc/train/images': [1, 2], 'sbem-mito/train/images': [2, 3],
                     'unlabelled/podocyte-tem': [1, 2]}, share
    assert res['pretrain_data'] == ['pre_share/' + k for k in share]
    pre = res['pretrain']['affmae_tiny']
    assert pre['share'] == .5 and pre['n_slices'] == 4 and set(pre['mix']) == set(res['pretrain_data'])
    _run('--data', data, '--out', tmp_path / 'out_whole', *pre_args, '--save-pretrained', whole)
    ft = ('--data', data, '--out', out, '--archs', 'affmae_tiny', '--sets', 'sbem-mito', '--fracs', .5, '--ft-steps', 3,
          '--compare-head', '')
    err = _run(*ft, '--compare-pretrained', half, ok=False)
    assert "--compare-pretrained fine-tunes kept pretrainings beside --load-pretrained's" in err, err
    err = _run(*ft, '--load-pretrained', whole, '--compare-pretrained', tmp_path / 'data', ok=False)
    assert f'--compare-pretrained {data}: no pretrain.json and affmae_tiny.pt' in err, err
    err = _run(*ft, '--load-pretrained', whole, '--compare-pretrained', f'{half},{tmp_path}/x/half', ok=False)
    assert 'folders need names of their own' in err, err
    _run(*ft, '--load-pretrained', whole, '--compare-pretrained', half)
    res = json.loads((out / 'real_em.json').read_text())
    runs = {(r['init'], r.get('variant')): r for r in res['sets']['sbem-mito']['runs'] if r['arch'] == 'affmae_tiny'}
    assert set(runs) == {('pretrained', None), ('scratch', None), ('pretrained', 'pretrained half')}, set(runs)
    assert runs['pretrained', 'pretrained half']['pretrained_in'] == 'half'
    assert runs['pretrained', 'pretrained half']['miou'] != runs['pretrained', None]['miou']     # other weights
    other = res['compare_pretrained']['half']
    assert other['pretrain']['share'] == .5 and other['pre_share_slices'] == share and other['dir'] == str(half)
    assert res['pretrain']['affmae_tiny']['share'] == 1 and 'pre_share_slices' not in res
