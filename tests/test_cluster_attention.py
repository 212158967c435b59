"""Cluster attention: the Triton kernels (run by Triton's interpreter on the CPU, TRITON_INTERPRET=1) and the torch
path against the float64 reference, forward and every gradient, on random ragged cases; argument errors."""
import os
os.environ.setdefault('TRITON_INTERPRET', '1')   # must be set before the kernels are defined
import pytest, torch
from affmae.cluster_attention import cluster_attention, cluster_attention_packed, cluster_attention_ref

TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (4e-3, 2e-2)}   # (forward, gradients) relative errors

def rel(a, b):
    "‖a−b‖/‖b‖, the denominator floored at an RMS of 1e-2 (exactly-zero references, e.g. dq of one-key rows)."
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-2 * b.numel()**.5)).item()

def random_case(g: torch.Generator, dtype, huge=False, wide=False):
    """Random ragged case: shapes, -1 padding, duplicates, fully padded clusters, optional bias, blank, huge logits;
    `wide`: D = 128 and 65-100 neighbours, more than one key chunk (BM = 64 in fp16, 32 in fp32)."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    B, H, G, Q, D = r(1, 2), r(1, 2), r(1, 4), [1, 2, 3, 8, 8, 16, 20][r(0, 6)], [16, 32, 24][r(0, 2)]
    N, Nk, M = G * Q, r(1, 40), r(1, 24)
    if wide: D, Nk, M = 128, r(20, 120), r(65, 100)
    idx = torch.randint(0, Nk, (B, G, M), generator=g)
    idx[torch.rand(B, G, M, generator=g) < torch.rand((), generator=g) * 0.6] = -1     # ragged padding
    idx[torch.rand(B, G, M, generator=g) < 0.2] = r(0, Nk - 1)                          # duplicates
    if r(0, 2) == 0: idx[r(0, B - 1), r(0, G - 1)] = -1                                 # a fully padded cluster
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (N, Nk, Nk))
    bias = torch.randn(B, H, N, M, generator=g) if r(0, 1) else None
    blank = [torch.randn(H, D, generator=g) for _ in range(2)] if r(0, 1) else None
    if huge:   # logits of order 1e3..1e4
        q, k = q * 30, k * 30
        if bias is not None: bias = bias * 3e3
        if blank is not None: blank[0] = blank[0] * 30
    cast = lambda t: t.to(dtype) if t is not None else None
    return [cast(t) for t in (q, k, v)], idx, cast(bias), (None if blank is None else [cast(t) for t in blank])

def dense_locality(qpos, kpos, coef, idx):
    "The locality term as a dense float64 bias `(B, H, N, M)`, built independently: coef_h·‖qpos_n − kpos_j‖²."
    B, G, M = idx.shape
    kp = kpos.double()[torch.arange(B)[:, None, None], idx.clamp_min(0)]          # (B, G, M, 2); padding masked anyway
    d2 = (qpos.double().view(B, G, -1, 1, 2) - kp[:, :, None]).square().sum(-1).reshape(B, -1, M)
    return coef[:, None, None] * d2[:, None]

def random_locality(g, B, H, N, Nk, large=False):
    """fp32 positions and coefficients: within 8 patches, coefficients of either sign; or `large`, positions near 500
    within 40 of each other and coefficients around -0.1, so that the term spans hundreds of logits."""
    base, span = (460., 40.) if large else (0., 8.)
    qpos, kpos = (base + span * torch.rand(B, n, 2, generator=g) for n in (N, Nk))
    coef = -(0.05 + 0.1 * torch.rand(H, generator=g)) if large else 0.3 * torch.randn(H, generator=g)
    return qpos, kpos, coef

def check(seed, dtype, impl='triton', huge=False, blank=None, loc=None, wide=False):
    """One random case against the float64 reference; `blank` forces the blank token on (True) or off (False);
    `loc` adds the locality term ('large': large positions), checked against its dense float64 bias."""
    g = torch.Generator().manual_seed(seed)
    (q, k, v), idx, bias, bl = random_case(g, dtype, huge, wide)
    if blank is False: bl = None
    elif blank and bl is None: bl = [torch.randn(q.shape[1], q.shape[3], generator=g).to(dtype) for _ in range(2)]
    if loc:
        qpos, kpos, coef = random_locality(g, q.shape[0], q.shape[1], q.shape[2], k.shape[2], loc == 'large')
        idx[-1, -1] = -1                                                             # an all-padded cluster
    ins = [q, k, v] + ([bias] if bias is not None else []) + (bl or []) + ([coef] if loc else [])
    xs = [t.clone().requires_grad_() for t in ins]
    rs = [t.double().requires_grad_() for t in ins]
    opt = lambda ts: dict(bias=ts[3] if bias is not None else None,
                          blank=tuple(ts[3 + (bias is not None):][:2]) if bl else None)
    out = cluster_attention(*xs[:3], idx, impl=impl, **opt(xs), locality=(qpos, kpos, xs[-1]) if loc else None)
    ro = opt(rs)
    if loc:
        d2 = dense_locality(qpos, kpos, torch.ones(q.shape[1], dtype=torch.float64), idx)   # (B, H, N, M)
        dense = rs[-1][:, None, None] * d2
        dense.retain_grad()                                                          # dS, to scale coef's error
        ro['bias'] = dense if bias is None else ro['bias'] + dense
    ref = cluster_attention_ref(*rs[:3], idx, **ro)
    assert out.dtype == dtype and out.shape == ref.shape
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(go.to(dtype)); ref.backward(go)
    tf, tg = TOL[dtype]
    if huge: tf, tg = 4 * tf, 4 * tg   # logits ~1e4 carry an absolute fp32 rounding of ~1e-3 into every exponent
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in xs)
    assert rel(out, ref) < tf, (seed, rel(out, ref))
    names = ['q', 'k', 'v'] + (['bias'] if bias is not None else []) + (['k_blank', 'v_blank'] if bl else []) + \
            (['coef'] if loc else [])
    for name, x, r in zip(names, xs, rs):
        if name == 'coef':   # sums of dS·d²: the error relative to Σ|dS|·d² (floored for all-zero references)
            d2v = d2[:, 0][(idx >= 0).repeat_interleave(q.shape[2] // idx.shape[1], 1)]   # valid pairs
            scale = (dense.grad.abs() * d2).sum() + 1e-2 * d2v.square().mean().sqrt().nan_to_num()
            err = ((x.grad - r.grad).abs().sum() / scale.clamp_min(1e-30)).item()
        else: err = rel(x.grad, r.grad)
        assert err < tg, (seed, name, err)
    empty = (idx < 0).all(-1)   # fully padded clusters: the blank's value (zeros without a blank), zero dq without
    rows = empty.repeat_interleave(q.shape[2] // idx.shape[1], 1)[:, None].expand(out.shape[:3])
    if bl is None: assert (out.detach()[rows] == 0).all() and (xs[0].grad[rows] == 0).all()
    else: assert torch.allclose(out.detach().float()[rows], ref.detach().float()[rows], atol=tf * 10)

@pytest.mark.parametrize('seed', range(24))
def test_triton_fp32(seed): check(seed, torch.float32)

@pytest.mark.parametrize('seed', range(100, 124))
def test_triton_fp16(seed): check(seed, torch.float16)

@pytest.mark.parametrize('seed', range(200, 208))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_huge_logits(seed, dtype): check(seed, dtype, huge=True)

@pytest.mark.parametrize('seed', range(220, 224))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_several_chunks(seed, dtype):
    "More neighbours than one key chunk holds: the backward's Δ comes from the stored output (`ONE_CHUNK` off)."
    check(seed, dtype, blank=seed % 2 == 0, loc=seed % 4 < 2, wide=True)

def blank_dominated(dtype, seed, M=48):
    "q, k, v, blank key, blank value in `dtype`, and neighbour lists of `M`: most of the weight on the blank key."
    g = torch.Generator().manual_seed(seed)
    B, H, G, Q, Nk, D = 1, 2, 6, 8, 300, 32
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (G * Q, Nk, Nk))
    kb, vb = q.mean((0, 2)) * 60, torch.randn(H, D, generator=g)
    ins = [t.to(dtype) for t in (q, k, v, kb, vb)]
    return ins, torch.randint(0, Nk, (B, G, M), generator=g)

@pytest.mark.parametrize('seed', range(2))
def test_blank_dominated_as_accurate_as_torch(seed):
    """Where the blank takes almost all the weight, every gradient of the fp16 kernel is as close to float64 as
    PyTorch's own fp16 attention is (within 2x): one key chunk, so Δ = Σ P·dP from the kernel's fp32 P, not from the
    fp16-rounded output, whose rounding would dominate the cancelling dS."""
    ins, idx = blank_dominated(torch.float16, seed)
    runs = []
    for impl, dt in (('triton', None), ('torch', None), ('torch', torch.float64)):
        xs = [(t if dt is None else t.to(dt)).clone().requires_grad_() for t in ins]
        f = cluster_attention if impl == 'triton' else cluster_attention_ref
        out = f(*xs[:3], idx, blank=tuple(xs[3:]), **({'impl': 'triton'} if impl == 'triton' else {}))
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        runs.append([out, *torch.autograd.grad(out, xs, go.to(out.dtype))])
    names = ['out', 'q', 'k', 'v', 'k_blank', 'v_blank']
    for name, ours, lowp, ref in zip(names, *runs):
        assert rel(ours, ref) <= 2 * rel(lowp, ref) + 1e-4, (name, rel(ours, ref), rel(lowp, ref))

@pytest.mark.parametrize('seed', range(300, 304))
def test_torch_path(seed): check(seed, torch.float32, impl='torch')

@pytest.mark.parametrize('seed', range(400, 410))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_blank(seed, dtype): check(seed, dtype, blank=True)

@pytest.mark.parametrize('seed', range(500, 512))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_locality(seed, dtype): check(seed, dtype, loc=True)

@pytest.mark.parametrize('seed', range(520, 526))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_locality_large(seed, dtype): check(seed, dtype, loc='large')

@pytest.mark.parametrize('seed', range(540, 544))
def test_torch_locality(seed): check(seed, torch.float32, impl='torch', loc=(True, 'large')[seed % 2])

@pytest.mark.parametrize('seed', range(560, 564))
def test_triton_locality_blank(seed): check(seed, torch.float32, blank=True, loc=True)

@pytest.mark.parametrize('seed', range(580, 584))
@pytest.mark.parametrize('self_attn', [True, False])
@pytest.mark.parametrize('impl', ['triton', 'torch'])
def test_packed(seed, self_attn, impl):
    """`cluster_attention_packed` on `(B, N, 3, H, D)` (self-attention) or `(B, Nk, 2, H, D)` beside `q`: output and
    the packed gradient against the float64 reference on the unpacked views; bias, blank and locality in turn."""
    g = torch.Generator().manual_seed(seed)
    B, H, G, Q, D, M = 2, 2, 3, (3, 8)[seed % 2], (16, 24)[seed // 2 % 2], 7
    N = G * Q
    Nk = N if self_attn else N + 5
    idx = torch.randint(-1, Nk, (B, G, M), generator=g)
    idx[0, 1] = -1                                                                   # an all-padded cluster
    q = None if self_attn else torch.randn(B, H, N, D, generator=g)
    kv = torch.randn(B, Nk, 3 if self_attn else 2, H, D, generator=g)
    bias = torch.randn(B, H, N, M, generator=g) if seed % 2 else None
    blank = [torch.randn(H, D, generator=g) for _ in range(2)] if seed >= 582 else []
    qpos, kpos, coef = random_locality(g, B, H, N, Nk)
    xs = [t.requires_grad_() for t in (q, kv, bias, *blank, coef) if t is not None]
    ref = {id(t): t.detach().double().requires_grad_() for t in xs}
    r = lambda t: None if t is None else ref[id(t)]
    out = cluster_attention_packed(q, kv, idx, bias, impl=impl, blank=tuple(blank) or None,
                                   locality=(qpos, kpos, coef))
    if impl == 'triton': assert out.transpose(1, 2).is_contiguous()               # (B, N, H, D): a free reshape
    views = [t.transpose(1, 2) for t in r(kv).unbind(2)]
    expect = cluster_attention_ref(*([] if self_attn else [r(q)]), *views, idx, r(bias),
                                   blank=tuple(map(r, blank)) or None, locality=(qpos, kpos, r(coef)))
    go = torch.randn(expect.shape, generator=g, dtype=torch.float64)
    out.backward(go.float()); expect.backward(go)
    assert rel(out, expect) < 1e-4
    for x in xs: assert rel(x.grad, r(x).grad) < 1e-3, x.shape

def test_packed_errors():
    q, kv = torch.randn(1, 2, 8, 16), torch.randn(1, 8, 2, 2, 16)
    idx = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r'kv must hold the queries, keys and values as \(B, N, 3, H, D\)'):
        cluster_attention_packed(None, kv, idx)
    with pytest.raises(ValueError, match=r'kv must hold the keys and values as \(B, N, 2, H, D\)'):
        cluster_attention_packed(q, kv[:, :, :1], idx)
    with pytest.raises(ValueError, match='kv must hold'): cluster_attention_packed(q, kv[0], idx)

@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_locality_is_bias(impl):
    """`locality` gives what the dense bias of the same positions gives, in outputs and gradients (`coef`'s through
    the bias), with positions of any float dtype and strides (a batch-broadcast `qpos`, a `kpos` with padded rows);
    the positions get no gradient."""
    g = torch.Generator().manual_seed(13)
    B, H, N, Nk, D, G, M = 2, 2, 24, 30, 16, 3, 13
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (N, Nk, Nk))
    idx = torch.randint(-1, Nk, (B, G, M), generator=g)
    qpos = (torch.rand(1, N, 2, generator=g) * 10).double().expand(B, -1, -1).requires_grad_()
    kpos = (torch.rand(B, Nk, 3, generator=g) * 10)[..., :2]
    coef = torch.randn(H, generator=g).requires_grad_()
    go = torch.randn(B, H, N, D, generator=g)
    outs = []
    for opt in (dict(locality=(qpos, kpos, coef)), dict(bias=dense_locality(qpos.detach(), kpos, coef, idx).float())):
        for t in (q, k, v, coef): t.grad = None
        o = cluster_attention(q, k, v, idx, impl=impl, **opt)
        o.backward(go)
        outs.append([o.detach()] + [t.grad.clone() for t in (q, k, v, coef)])
    for a, b in zip(*outs): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)   # scores ~100: fp32 rounding
    assert qpos.grad is None and outs[0][-1].dtype == torch.float32

def test_locality_bf16_plumbing():
    "bf16 q/k/v (the interpreter's bf16 dots are wrong: dtypes and finiteness only), fp32 coef: fp32 gradient."
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    qpos, kpos, coef = random_locality(g, 1, 2, 16, 16)
    coef.requires_grad_()
    out = cluster_attention(q, k, v, torch.randint(-1, 16, (1, 2, 8), generator=g), impl='triton',
                            locality=(qpos.half(), kpos, coef))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and coef.grad.dtype == torch.float32 and torch.isfinite(coef.grad).all()

@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_blank_only(impl):
    "A fully padded cluster with a blank token returns the blank's value; a huge blank score hides the neighbours."
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 16, 16, generator=g).unbind(0)
    kb, vb = torch.randn(2, 2, 16, generator=g).unbind(0)
    idx = torch.randint(0, 16, (1, 2, 8), generator=g)
    idx[0, 0] = -1
    out = cluster_attention(q, k, v, idx, impl=impl, blank=(kb, vb))
    torch.testing.assert_close(out[0, :, :8], vb[:, None].expand(2, 8, 16))
    u = torch.randn(2, 16, generator=g)
    q[0, :, 8:] = u[:, None]                                              # cluster 1: one query repeated ...
    big = cluster_attention(q, k, v, idx, impl=impl, blank=(10 * u, vb))   # ... scoring 10|u|²/4 on the blank
    torch.testing.assert_close(big[0, :, 8:], vb[:, None].expand(2, 8, 16), rtol=1e-4, atol=1e-4)

def test_strided_inputs():
    "q, k, v as views of one fused (B, N, 3, H, D) projection, as an attention layer makes them."
    g = torch.Generator().manual_seed(7)
    B, N, H, D, G, M = 2, 32, 2, 16, 4, 12
    qkv = torch.randn(B, N, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)
    idx = torch.randint(-1, N, (B, G, M), generator=g)
    test = cluster_attention(*qkv, idx, impl='triton')
    assert rel(test, cluster_attention_ref(*(t.double() for t in qkv), idx)) < 1e-4

def test_errors():
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    idx = torch.zeros(1, 2, 4, dtype=torch.long)
    pq, pk, c = torch.rand(1, 8, 2), torch.rand(1, 10, 2), torch.randn(2)
    f = lambda **kw: cluster_attention(**{**dict(q=q, k=k, v=v, nbhd_idx=idx, impl='triton'), **kw})
    for kw, err, msg in [(dict(k=torch.randn(1, 2, 10, 8)), ValueError, 'k and v must have the same shape'),
                         (dict(k=torch.randn(1, 3, 10, 16), v=torch.randn(1, 3, 10, 16)), ValueError, 'k/v must be'),
                         (dict(nbhd_idx=torch.zeros(1, 3, 4, dtype=torch.long)), ValueError, 'must divide N'),
                         (dict(nbhd_idx=torch.full((1, 2, 4), 10)), ValueError, 'out of range'),
                         (dict(nbhd_idx=torch.full((1, 2, 4), -2)), ValueError, 'out of range'),
                         (dict(nbhd_idx=torch.zeros(1, 2, 4)), TypeError, 'integer'),
                         (dict(nbhd_idx=torch.zeros(1, 2, 4, dtype=torch.bool)), TypeError, 'integer'),
                         (dict(bias=torch.randn(1, 2, 8, 5)), ValueError, 'bias must be (B, H, N, M)'),
                         (dict(q=torch.randn(1, 2, 8, 8), k=torch.randn(1, 2, 10, 8), v=torch.randn(1, 2, 10, 8)),
                          ValueError, 'unsupported head dim'),
                         (dict(q=q.double(), k=k.double(), v=v.double()), TypeError, 'unsupported dtype'),
                         (dict(v=v.half()), TypeError, 'share a dtype'),
                         (dict(impl='cuda'), ValueError, 'impl must be'),
                         (dict(blank=torch.randn(2, 16)), TypeError, 'blank must be a pair'),
                         (dict(blank=(torch.randn(2, 16), torch.randn(3, 16))), ValueError, 'v_blank must be (H, D)'),
                         (dict(blank=(torch.randn(2, 8), torch.randn(2, 16))), ValueError, 'k_blank must be (H, D)'),
                         (dict(blank=(torch.randn(2, 16), None)), TypeError, 'v_blank must be a torch.Tensor'),
                         (dict(locality=(pq, pk)), TypeError, 'locality must be a triple'),
                         (dict(locality=(pq[:, :4], pk, c)), ValueError, 'qpos must be (B, N, 2)'),
                         (dict(locality=(pq, pq, c)), ValueError, 'kpos must be (B, Nk, 2)'),
                         (dict(locality=(pq, pk, c[:1])), ValueError, 'coef must be (H,)'),
                         (dict(locality=(pq, pk.long(), c)), TypeError, 'kpos must be floating point'),
                         (dict(locality=(pq, pk, 0.1)), TypeError, 'coef must be a torch.Tensor')]:
        with pytest.raises(err, match=None) as e: f(**kw)
        assert msg in str(e.value), (msg, str(e.value))

@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_check_idx(impl):
    "`check_idx=False` (the models' trusted indices) skips only the range check: same result in range."
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(3, 1, 2, 16, 16, generator=g).unbind(0)
    idx = torch.randint(-1, 16, (1, 4, 8), generator=g)
    unchecked = cluster_attention(q, k, v, idx, impl=impl, check_idx=False)
    torch.testing.assert_close(unchecked, cluster_attention(q, k, v, idx, impl=impl), rtol=0, atol=0)
    bad = idx.clone(); bad[0, 0, 0] = 99
    with pytest.raises(ValueError, match='out of range'): cluster_attention(q, k, v, bad, impl=impl)
    if impl == 'torch':   # the reference gathers clamped ids (Triton would read out of bounds: not run unchecked)
        with pytest.raises(RuntimeError): cluster_attention(q, k, v, bad, impl=impl, check_idx=False)


@pytest.mark.parametrize('impl', ['torch', 'triton'])
def test_batch_broadcast_bias(impl):
    "A bias shared by the batch (expanded from batch 1, stride 0) gives the outputs and gradients of its copy."
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 16, 16, generator=g).requires_grad_() for _ in range(3))
    idx = torch.randint(-1, 16, (3, 4, 8), generator=g)
    b1 = torch.randn(1, 2, 16, 8, generator=g).requires_grad_()
    go = torch.randn(3, 2, 16, 16, generator=g)
    outs = []
    for bias in (b1.expand(3, -1, -1, -1), b1.expand(3, -1, -1, -1).contiguous()):
        for t in (q, k, v, b1): t.grad = None
        o = cluster_attention(q, k, v, idx, bias, impl=impl)
        o.backward(go)
        outs.append([o.detach()] + [t.grad.clone() for t in (q, k, v, b1)])
    for a, b in zip(*outs): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bench_tiny(tmp_path):
    "The benchmark script's CPU mode writes every point of its Benchmarks, with the run's metadata, to JSON."
    import importlib.util, json, pathlib
    path = pathlib.Path(__file__).parents[1] / 'kernels' / 'bench_cluster_attention.py'
    spec = importlib.util.spec_from_file_location('bench_cluster_attention', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(['--tiny', '--reps', '1', '--out', str(tmp_path / 'b.json')])
    res = json.loads((tmp_path / 'b.json').read_text())
    assert res['device'] == 'CPU (Triton interpreter)' and '--tiny' in res['command'] and res['date']
    assert [b['args']['mode'] for b in res['benchmarks']] == ['fwd', 'fwd+bwd']
    for b in res['benchmarks']:
        assert set(b['ms']) == set(bench.PROVIDERS) and b['args']['B'] == bench.TINY_SHAPE['B']
        assert all(len(t) == len(b['x_vals']) and all(ms > 0 for ms in t) for t in b['ms'].values())


def test_module_blank():
    """`ClusterAttention(blank=True)` owns a (heads, head dim) blank key and value that get gradients, the same in
    both impls; the encoder's `blank` option reaches every block; `blank=False` adds no parameter."""
    from affmae.aff import AFFEncoder, ClusterAttention
    g = torch.Generator().manual_seed(0)
    att = ClusterAttention(32, 2, impl='triton', blank=True)
    assert [tuple(p.shape) for p in (att.blank_k, att.blank_v)] == [(2, 16), (2, 16)]
    assert att.blank_k.abs().max() < .1                                   # small at init, like the projections
    x, nbhd = torch.randn(1, 16, 32, generator=g), torch.randint(-1, 16, (1, 2, 8), generator=g)
    nbhd[0, 0] = -1                                                       # cluster 0 sees only the blank
    att(x, nbhd).sum().backward()
    assert att.blank_k.grad.abs().sum() > 0 and att.blank_v.grad.abs().sum() > 0
    ref = ClusterAttention(32, 2, impl='torch', blank=True)
    ref.load_state_dict(att.state_dict())
    ref(x, nbhd).sum().backward()
    for a, b in ((att.blank_k, ref.blank_k), (att.blank_v, ref.blank_v)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert 'blank_k' not in dict(ClusterAttention(32, 2).named_parameters())
    enc = AFFEncoder(dims=(16, 32), depths=(1, 2), heads=(1, 2), blank=True)
    blocks = [b for stage in enc.stages for b in stage]
    assert len(blocks) == 3 and all(b.attn.blank_k is not None for b in blocks)
    outs = enc(torch.randn(2, 1, 32, 32, generator=g))
    assert all(torch.isfinite(t.x).all() for t in outs)


def test_blank_cast():
    "An fp32 blank with fp16 q/k/v (a model's parameters under autocast) is cast for the kernel; its grads stay fp32."
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).half() for _ in range(3))
    blank = [torch.randn(2, 16, generator=g).requires_grad_() for _ in range(2)]
    ref_blank = [t.detach().double().requires_grad_() for t in blank]
    idx = torch.randint(-1, 16, (1, 2, 8), generator=g)
    cluster_attention(q, k, v, idx, impl='triton', blank=tuple(blank)).float().sum().backward()
    cluster_attention_ref(q.double(), k.double(), v.double(), idx, blank=tuple(ref_blank)).sum().backward()
    for t, r in zip(blank, ref_blank):
        assert t.grad.dtype == torch.float32 and rel(t.grad, r.grad) < TOL[torch.float16][1]


def test_decoder_locality():
    """The point decoder's layers pass their distance bias as `locality`: the Triton path gives the torch path's
    outputs and gradients, the distance parameters included, with queries at every patch (batch-broadcast positions)
    and at the masked ones."""
    from affmae.registry import create_model
    torch.manual_seed(0)
    img = torch.randn(2, 1, 64, 64)
    models = [create_model('affmae_tiny', impl=impl) for impl in ('torch', 'triton')]
    models[1].load_state_dict(models[0].state_dict())
    mask = models[0].make_mask(img)
    for m in models:
        stages = m.encoder(img, mask)
        m.zero_grad()
        m.out = [m.decoder(stages, 8, 8, mask)[-1], m.decoder(stages, 8, 8)[-1]]
        sum(p.square().sum() for p in m.out).backward()
    for a, b in zip(models[0].out, models[1].out): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for layer_a, layer_b in zip(models[0].decoder.layers, models[1].decoder.layers):
        for name in ('reach_cross', 'reach_self'):
            ga, gb = getattr(layer_a, name).grad, getattr(layer_b, name).grad
            assert ga.abs().sum() > 0
            torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5)

def test_packed_backward_has_no_stack():
    """The AFF block's attention on its fused projection: the backward writes the packed gradient directly, with no
    `stack`/`cat` of dq, dk, dv (which the unpacked views cost), and the same gradients as the unpacked call."""
    from affmae.aff import ClusterAttention
    g = torch.Generator().manual_seed(5)
    att = ClusterAttention(32, 2, impl='triton')
    x = torch.randn(2, 16, 32, generator=g, requires_grad=True)
    nbhd = torch.randint(-1, 16, (2, 4, 6), generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        att(x, nbhd).square().sum().backward()
    names = {e.name for e in prof.events()}
    assert not names & {'aten::stack', 'aten::cat'}, names & {'aten::stack', 'aten::cat'}
    grads = [x.grad.clone(), *(p.grad.clone() for p in att.parameters())]
    x.grad = None; att.zero_grad()
    B, N, C = x.shape                                                                    # the unpacked call
    q, k, v = att.qkv(x).view(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
    o = cluster_attention(q, k, v, nbhd, impl='triton')
    att.proj(o.transpose(1, 2).reshape(B, N, C)).square().sum().backward()
    for a, b in zip(grads, [x.grad, *(p.grad for p in att.parameters())]): torch.testing.assert_close(a, b)
