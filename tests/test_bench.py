"""Tests of `affmae.measure` and `affmae.bench` (the `affmae bench` harness), on the CPU at tiny sizes.

The harness must run without a GPU (it is only meaningful on one): FLOP counts are checked against hand
counts, the largest-batch search against known thresholds, the profile breakdown against a model whose
MLP share is known to grow, and the whole run (API and command line) for the JSON schema the notebook plots.
"""
import functools, json, math, os, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from affmae.bench import bench_table, parse_bs, profile_table, run_bench
from affmae.measure import (CATEGORIES, attn_cost, attn_flops, count_invisible, largest_fit, make_images,
                            make_optimizer, module_category, patch_functions, profile_step, step_flops)

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads, self.norm1, self.norm2 = heads, nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.attn(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class TinyMAE(nn.Module):
    "Stand-in with the `create_model` contract: `model(img)['loss']`, 8x8 patches, mask ratio 0.5."
    def __init__(self, patch=8, dim=32, depth=2, heads=2, hidden=128, ratio=0.5):
        super().__init__()
        self.patch, self.ratio = patch, ratio
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.decoder = nn.Sequential(Block(dim, heads, 4 * dim), nn.Linear(dim, patch * patch))
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def forward(self, img):
        p = self.patch
        x = nn.functional.unfold(img, p, stride=p).transpose(1, 2)
        B, L, _ = x.shape
        keep = torch.rand(B, L).argsort(1)[:, :L - round(self.ratio * L)]
        tok = self.patch_embed(x).gather(1, keep[..., None].expand(-1, -1, self.mask_token.numel()))
        for b in self.blocks: tok = b(tok)
        full = self.mask_token.expand(B, L, -1).scatter(1, keep[..., None].expand_as(tok), tok)
        masked = torch.ones(B, L).scatter(1, keep, 0.)
        return dict(loss=(((self.decoder(full) - x) ** 2).mean(-1) * masked).sum() / masked.sum())


def tiny_shallow(**kw): return TinyMAE(depth=1, **kw)
def tiny_deep(**kw): return TinyMAE(depth=3, **kw)


class TwoLinear(nn.Module):
    def __init__(self, a=12, b=20, c=7):
        super().__init__()
        self.l1, self.l2 = nn.Linear(a, b, bias=False), nn.Linear(b, c, bias=False)
    def forward(self, img): return dict(loss=self.l2(self.l1(img.flatten(1)).relu()).square().mean())


def test_step_flops_hand_count():
    # forward 2B(ab+bc); backward: both weight grads + the hidden activation's grad (not the input's)
    a, b, c = 12, 20, 7
    f = step_flops(TwoLinear(a, b, c), torch.randn(5, 1, 3, 4), amp=False)
    assert f['total'] == 4 * a * b + 6 * b * c
    assert f['fwd'] == 2 * (a * b + b * c)
    assert f['fwd_by_module'] == {'l1': 2 * a * b, 'l2': 2 * b * c}
    assert sum(f['by_op'].values()) == f['total']


def test_attention_marker_counts_fwd_and_bwd():
    B, H, N, D, G, M = 2, 3, 16, 8, 4, 5
    q, idx = torch.randn(B, H, N, D, requires_grad=True), torch.zeros(B, G, M, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        out = q * 2
        attn_cost(q, idx, False)
        def bwd(grad): attn_cost(q, idx, True)
        out.register_hook(bwd)
        out.sum().backward()
    assert fc.get_total_flops() == (4 + 10) * B * H * N * M * D      # forward + 2.5x forward in backward


def _nbhd_attention(q, k, v, idx, bias=None, impl='auto'):
    "Plain PyTorch neighbourhood attention (one neighbour list per query): the path FlopCounterMode can see."
    B, H, N, D = q.shape
    kg, vg = (t[:, :, idx.reshape(-1)].reshape(B, H, N, -1, D) for t in (k, v))
    return torch.einsum('bhnm,bhnmd->bhnd', torch.einsum('bhnd,bhnmd->bhnm', q, kg).softmax(-1), vg)


@pytest.mark.parametrize('hidden', [True, False])
def test_cluster_attention_counted_once(hidden):
    # A Triton launch is invisible to FlopCounterMode (simulated: the PyTorch path with dispatch modes off):
    # the wrapper adds the analytic count. The visible PyTorch path is counted natively and the wrapper adds
    # nothing. Either way the forward counts 4·B·H·N·M·D, and the backward 2.5x that when hidden.
    from torch.utils._python_dispatch import _disable_current_modes
    def cluster_attention(q, k, v, idx, bias=None, impl='auto'):
        with _disable_current_modes() if hidden else torch.enable_grad(): return _nbhd_attention(q, k, v, idx)
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    q.requires_grad_()
    idx = torch.randint(0, 16, (1, 16, 5))
    with FlopCounterMode(display=False) as fc:
        count_invisible(cluster_attention, fc)(q, k, v, idx).sum().backward()
    seen = fc.get_flop_counts()['Global']
    marker = sum(n for op, n in seen.items() if 'attn_cost' in str(op))
    fwd = attn_flops(q.shape, idx.shape)
    assert marker == (fwd + attn_flops(q.shape, idx.shape, backward=True) if hidden else 0)
    if not hidden: assert fc.get_total_flops() >= fwd    # forward counted natively (+ its backward)


def test_patch_functions_restores():
    import affmae.measure as M
    orig = M.attn_flops
    wrap = lambda f: (lambda *a, **k: 'patched') if f.__name__ == 'attn_flops' else f
    with patch_functions({'affmae.measure': wrap}):
        assert M.attn_flops((1, 1, 1, 1), (1, 1, 1)) == 'patched'
        assert M.largest_fit is largest_fit      # functions whose wrapper returns them unchanged are untouched
    assert M.attn_flops is orig


@pytest.mark.parametrize('bstar', [0, 1, 2, 3, 5, 37, 64, 100, 1000, 4095, 4096, 10**6])
def test_largest_fit_exact(bstar):
    calls = []
    got = largest_fit(lambda b: calls.append(b) or b <= bstar, limit=4096)
    assert got == min(bstar, 4096)
    assert len(calls) <= 2 * math.log2(4096) + 2
    assert len(set(calls)) == len(calls)          # no batch tried twice


def test_largest_fit_tolerance():
    for bstar in (37, 300, 999):
        got = largest_fit(lambda b: b <= bstar, rel_tol=1 / 16)
        assert bstar * (1 - 1 / 16) <= got <= bstar


def test_module_categories():
    mod = lambda cls: type(cls, (nn.Module,), {})()
    cases = {('stages.0.1.attn', mod('ClusterAttention')): 'attention', ('merges.1', mod('TokenMerging')): 'merging',
             ('rpes.0', mod('RelPosBias')): 'attention', ('dec_blocks', nn.ModuleList()): 'decoder',
             ('decoder', mod('PointDecoder')): 'decoder', ('blocks.3.mlp', nn.Sequential()): 'mlp',
             ('embed', mod('PatchEmbed')): 'embed', ('norms.2', nn.LayerNorm(3)): 'norm',
             ('dec_blocks.1.attn', nn.Linear(1, 1)): 'decoder', ('decoder.layers.0.mlp', nn.Sequential()): 'decoder',
             ('encoder.stages.0.1', mod('AFFBlock')): None}
    for (name, m), cat in cases.items(): assert module_category(name, m) == cat, name


def _profile(model, bs=4, size=32):
    return profile_step(model, make_optimizer(model), make_images(bs, size, 'cpu'), amp=False, steps=1)


def test_profile_breakdown():
    m = TinyMAE()
    m.blocks[1].mlp = nn.Sequential(m.blocks[1].mlp, SlowBwd())      # a backward operator certain to cost the most
    p = _profile(m)
    ms = p['ms']
    assert set(ms) == set(CATEGORIES)
    assert all(ms[c] > 0 for c in ('attention', 'mlp', 'embed', 'decoder', 'optimizer')), ms
    assert ms['clustering'] == ms['merging'] == 0
    assert abs(sum(ms.values()) - p['busy_ms']) < 1e-6 * p['busy_ms']
    assert len(p['top_ops']) == 10 and all(op.split(':')[0] in CATEGORIES for op in p['top_ops'])
    assert next(iter(p['top_ops'])) == 'mlp: SlowBackwardBackward (bwd)' and p['syncs'] >= 0


class SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): time.sleep(0.5); return g


class SlowBwd(nn.Module):
    def forward(self, x): return SlowBackward.apply(x)


@pytest.mark.parametrize('where', ['mlp', 'attn', 'decoder'])
def test_profile_attributes_backward(where):
    # no hook runs in the backward: its time must still reach the category of the forward op it differentiates
    m = TinyMAE()
    if where == 'decoder': m.decoder[0].mlp = SlowBwd()
    else: setattr(m.blocks[1], where, nn.Sequential(getattr(m.blocks[1], where), SlowBwd()))
    ms = _profile(m)['ms']
    cat = {'attn': 'attention'}.get(where, where)
    assert ms[cat] >= 500 and max(v for c, v in ms.items() if c != cat) < 500, ms


def _check_schema(res, archs, sizes):
    assert res['schema'] == 'affmae.bench/2'
    for k in ('device', 'date', 'versions', 'config', 'records', 'command'): assert k in res
    assert {'python', 'torch', 'triton', 'cuda', 'affmae'} <= set(res['versions'])
    assert [(r['arch'], r['size']) for r in res['records']] == [(a, s) for s in sizes for a in archs]
    for r in res['records']:
        assert r['error'] is None
        for k in ('bs', 'params', 'patch_size', 'mask_ratio', 'flops_per_img', 'fwd_flops_per_img', 'step_ms',
                  'times_ms', 'img_per_s', 'peak_mem_gib', 'profile'): assert k in r, k
        assert r['img_per_s'] > 0 and r['flops_per_img'] > r['fwd_flops_per_img'] > 0
        assert r['patch_size'] == 8 and r['mask_ratio'] == 0.5 and 'mask' in r


def test_model_info_mask():
    "A record names the model's mask kind (None for a model without one)."
    from affmae.bench import build_model, _model_info
    assert _model_info(build_model('affmae_tiny', 'cpu'))['mask'] == 'perlin_quarters'
    assert _model_info(build_model('vitmae_tiny', 'cpu', mask='random'))['mask'] == 'random'
    assert _model_info(tiny_shallow())['mask'] is None


def test_run_bench_cpu(tmp_path):
    out = tmp_path / 'res.json'
    res = run_bench([tiny_shallow, tiny_deep], sizes=(32, 48), bs=(2, 1), auto=True, steps=2, warmup=0,
                    max_bs=2, device='cpu', json_path=out, log=lambda s: None)
    _check_schema(res, ['tiny_shallow', 'tiny_deep'], (32, 48))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    r = {(x['arch'], x['size']): x for x in res['records']}
    assert r['tiny_deep', 32]['flops_per_img'] > r['tiny_shallow', 32]['flops_per_img']
    assert r['tiny_shallow', 48]['flops_per_img'] > r['tiny_shallow', 32]['flops_per_img']
    assert all(x['auto']['bs'] == 2 and x['auto']['img_per_s'] > 0 for x in res['records'])
    t = bench_table(res)
    assert '| ratio tiny_shallow/tiny_deep | step |' in t and '| | eager | 48² | 1 |' in t
    assert all(x['mode'] == 'eager' for x in res['records'])          # no CUDA graphs on the CPU
    assert 'tiny_deep | eager | 48²' in profile_table(res)
    with pytest.raises(ValueError, match='captured steps need a CUDA device'):
        run_bench([tiny_shallow], sizes=(32,), modes=('captured',), device='cpu')


def test_parse_bs_errors():
    assert parse_bs('32,8,2', [512, 1024, 2048]) == ([32, 8, 2], False)
    assert parse_bs('auto', [512]) == (None, True)
    assert parse_bs('', [512]) == (None, False)
    with pytest.raises(ValueError, match="positive integers and/or 'auto'"): parse_bs('0', [512])
    with pytest.raises(ValueError, match='2 batch sizes for 3 image sizes'): parse_bs('4,2', [1, 2, 3])
    with pytest.raises(ValueError, match='2 batch sizes for 3 image sizes'):
        run_bench([tiny_shallow], (8, 16, 32), bs=(1, 2), device='cpu')


def _cli(tmp_path, *args):
    "Run `bench` from a script, as the `affmae` console script does: it parses the script's command line."
    script = tmp_path / 'affmae_bench.py'
    script.write_text('from affmae.bench import bench\nbench()\n')
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_cli(tmp_path):
    out = tmp_path / 'cli.json'
    p = _cli(tmp_path, '--archs', 'test_bench:tiny_shallow,test_bench:tiny_deep', '--sizes', '32', '--bs', '2',
             '--steps', '1', '--warmup', '0', '--device', 'cpu', '--json', str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    _check_schema(res, ['test_bench:tiny_shallow', 'test_bench:tiny_deep'], (32,))
    assert res['command'].startswith('affmae bench --archs')
    assert 'ratio test_bench:tiny_shallow/test_bench:tiny_deep' in p.stdout
    bad = _cli(tmp_path, '--archs', 'test_bench:tiny_shallow', '--sizes', '32', '--bs', 'lots', '--device', 'cpu')
    assert bad.returncode != 0 and "--bs: expected positive integers and/or 'auto'" in bad.stderr


def _registered(*names):
    import affmae
    try:
        for n in names: affmae.create_model(n)
    except Exception as e: pytest.skip(f'models not available yet: {e}')


def test_real_tiny_models():
    "The real tiny models through the same path, when they exist (AFFMAE's torch path on the CPU)."
    _registered('affmae_tiny', 'vitmae_tiny')
    res = run_bench(['affmae_tiny', 'vitmae_tiny'], sizes=(64,), bs=(2,), steps=1, warmup=0, device='cpu',
                    log=lambda s: None)
    _check_schema(res, ['affmae_tiny', 'vitmae_tiny'], (64,))
    p = {r['arch']: r['profile']['ms'] for r in res['records']}
    assert p['affmae_tiny']['attention'] > 0 and p['affmae_tiny']['clustering'] > 0 and p['affmae_tiny']['merging'] > 0
    assert p['vitmae_tiny']['clustering'] == 0 and p['vitmae_tiny']['decoder'] > 0
    assert all(p[a]['masking'] > 0 for a in p)          # Perlin masking, found through affmae.mae.MASKERS
    f = {r['arch']: r['fwd_flops_by_module'] for r in res['records']}
    assert set(f['affmae_tiny']) == {'encoder', 'decoder'} and {'blocks', 'dec_blocks'} <= set(f['vitmae_tiny'])
    assert sum(f['affmae_tiny'].values()) == pytest.approx(res['records'][0]['fwd_flops_per_img'])


def test_cli_checkpoint(tmp_path):
    "`--checkpoint 0`: affmae models only, the first stage's flag recorded in the results; bad stage lists refused."
    _registered('affmae_tiny')
    out = tmp_path / 'ck.json'
    p = _cli(tmp_path, '--archs', 'affmae_tiny', '--sizes', '32', '--bs', '2', '--steps', '1', '--warmup', '0',
             '--no_profile', '--device', 'cpu', '--checkpoint', '0', '--json', str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text())['config']['model_kw'] == {'checkpoint': [True, False, False, False]}
    for archs, ck, msg in (('affmae_tiny,vitmae_tiny', 'all', 'option of the affmae models'),
                           ('affmae_tiny', '0,9', '--checkpoint must be stage numbers in [0, 4)')):
        bad = _cli(tmp_path, '--archs', archs, '--sizes', '32', '--bs', '2', '--device', 'cpu', '--checkpoint', ck)
        assert bad.returncode != 0 and msg in bad.stderr, bad.stderr[-500:]


def test_profile_and_saved_tensor_scripts(tmp_path):
    "The GPU analysis scripts run on the CPU at tiny sizes and write what the results files hold."
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'TRITON_INTERPRET': '1'}
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True, env=env,
                                    cwd=ROOT, timeout=300)
    r = run(ROOT / 'kernels' / 'profile_ops.py', '--archs', 'affmae_tiny', '--size', 32, '--bs', 2, '--top', 5,
            '--warmup', 1, '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = json.loads((tmp_path / 'profile_ops_affmae_tiny_32_2.json').read_text())
    assert set(prof['profile']['ms']) == set(CATEGORIES) and len(prof['kernels']) == 5 and prof['events'] > 0
    r = run(ROOT / 'kernels' / 'saved_tensors.py', '--archs', 'affmae_tiny,vitmae_tiny', '--size', 32, '--bs', 2,
            '--out', tmp_path / 'saved.json')
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / 'saved.json').read_text())
    aff = saved['archs']['affmae_tiny']
    assert aff['activations_mib'] > 0 and any(k.startswith('encoder.stages.0') for k in aff['by_module_mib'])
    assert saved['activation_ratio'] == pytest.approx(aff['activations_mib'] /
                                                      saved['archs']['vitmae_tiny']['activations_mib'])


def test_memory_peak_breakdown_of_a_made_up_trace():
    "`kernels/memory_peak.py`'s trace replay: the peak, when it happens, and what is alive then, by allocation site."
    import importlib.util
    spec = importlib.util.spec_from_file_location('memory_peak', ROOT / 'kernels' / 'memory_peak.py')
    mp = importlib.util.module_from_spec(spec); spec.loader.exec_module(mp)
    fr = lambda f, n: [dict(filename='/x/torch/nn/functional.py', line=1, name='linear'),
                       dict(filename=f'/repo/affmae/{f}', line=n, name='fwd')]
    alloc = lambda addr, size, f='mlp.py', n=10: dict(action='alloc', addr=addr, size=size, frames=fr(f, n))
    free = lambda addr, size=0: dict(action='free_completed', addr=addr, size=size)
    trace = [alloc(1, 100), alloc(2, 50, 'mae.py', 7), dict(action='segment_alloc', addr=9, size=10**6), free(1),
             alloc(3, 300), alloc(4, 20, 'mae.py', 7), free(3), alloc(5, 200), free(99)]
    r = mp.peak_breakdown(trace, baseline=1000)
    assert (r['peak_bytes'], r['step_bytes_at_peak'], r['peak_entry'], r['alive_at_peak']) == (1370, 370, 5, 3)
    assert r['by_site'] == {'mlp.py:10 fwd': 300, 'mae.py:7 fwd': 70}
    early = mp.peak_breakdown([free(99, 60)] + trace, baseline=1000)    # a block from before the step, freed first
    assert (early['peak_bytes'], early['step_bytes_at_peak'], early['by_site']) == (1310, 310, r['by_site'])
    assert mp.peak_breakdown([], baseline=5)['peak_bytes'] == 5
    outside = [dict(action='alloc', addr=1, size=8, frames=[dict(filename='/x/torch/optim/adamw.py', line=3,
                                                                 name='step')])]
    assert mp.peak_breakdown(outside)['by_site'] == {'adamw.py:3 step': 8}
