"Acceptance tests of the AFF encoder (issue 5): clustering, merging, the encoder, on the CPU torch path."
import math, time
import pytest, torch
from affmae.clustering import (cluster_knn, cluster_tokens, curve_order, gather_rows, hilbert_index, knn,
                               neighbour_offsets)
from affmae.merging import TokenMerging, n_keep
from affmae.aff import AFFEncoder
from affmae.registry import create_model, register_model, list_models
from affmae.masking import perlin_mask


def brute_knn_dist(q, p, k, valid):
    "float64 distances of the k nearest valid points, -1 where fewer exist."
    d = torch.cdist(q.double(), p.double()).masked_fill(~valid[:, None], float('inf')).sort(-1).values[..., :k]
    return torch.nn.functional.pad(d, (0, k - d.shape[-1]), value=float('inf')).nan_to_num(posinf=-1.)


def chosen_dist(q, p, idx):
    d = (q[:, :, None].double() - gather_rows(p.double(), idx)).norm(dim=-1)
    return torch.where(idx >= 0, d, -1.)


def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('seed', range(4))
def test_knn_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, Q, N = 2, int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
    k = int(torch.randint(1, 70, (1,), generator=g))
    q, p = torch.rand(B, Q, 2, generator=g) * 200, torch.rand(B, N, 2, generator=g) * 200
    valid = torch.rand(B, N, generator=g) > .3
    idx = knn(q, p, k, valid, chunk=int(torch.randint(1, 5000, (1,), generator=g)))
    assert idx.shape == (B, Q, k)
    assert torch.allclose(chosen_dist(q, p, idx), brute_knn_dist(q, p, k, valid), atol=1e-4)
    ok = idx >= 0
    assert valid.gather(1, idx.clamp(min=0).flatten(1)).view_as(ok)[ok].all()


def test_knn_grid_ties_deterministic():
    "On a grid (many equal distances) ties go to the lower index, so trailing padding changes nothing."
    ys, xs = torch.meshgrid(torch.arange(12.), torch.arange(12.), indexing='ij')
    p = torch.stack([xs, ys], -1).reshape(1, -1, 2)
    q = torch.tensor([[[5.5, 5.5], [3., 4.]]])
    a = knn(q, p, 20)
    pp = torch.cat([p, torch.zeros(1, 50, 2)], 1)
    b = knn(q, pp, 20, (torch.arange(pp.shape[1]) < p.shape[1])[None])
    assert torch.equal(a, b)
    assert torch.allclose(chosen_dist(q, p, a), brute_knn_dist(q, p, 20, torch.ones(1, 144, dtype=torch.bool)))


@pytest.mark.parametrize('n_cand', [1, 4, 32])
def test_pruned_cluster_knn_identical_to_brute_force(n_cand):
    """The bound-pruned neighbourhood search returns exactly knn's ids (ties included); small n_cand forces the
    repair path."""
    torch.manual_seed(n_cand)
    # off-grid, and on a grid (ties)
    for pos in (torch.rand(2, 1504, 2) * 300, torch.rand(2, 1504, 2).mul(40).round() * 8):
        valid = torch.rand(2, 1504) > .3
        o = curve_order(pos, valid)
        ps, v = gather_rows(pos, o), valid.gather(1, o)
        w = v.view(2, -1, 8, 1).float()
        cen = (ps.view(2, -1, 8, 2) * w).sum(2) / w.sum(2).clamp_min(1)
        assert torch.equal(cluster_knn(cen, ps, v, 8, 64, n_cand=n_cand), knn(cen, ps, 64, v))


def test_hilbert_is_a_continuous_bijection():
    n = 16
    g = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing='xy'), -1).reshape(-1, 2)
    d = hilbert_index(g, 4)
    assert torch.equal(d.sort().values, torch.arange(n * n))
    path = g[d.argsort()]
    assert ((path[1:] - path[:-1]).abs().sum(-1) == 1).all()


@pytest.mark.parametrize('N,c,M', [(257, 8, 64), (64, 8, 16), (13, 4, 64)])
def test_clusters_balanced_and_neighbourhoods_exact(N, c, M):
    torch.manual_seed(N)
    B = 3
    pos, valid = torch.rand(B, N, 2) * 300, torch.rand(B, N) > .25
    valid[0] = True
    cl = cluster_tokens(pos, valid, c, M)
    Np = math.ceil(N / c) * c
    assert cl.order.shape == (B, Np) and cl.nbhd.shape == (B, Np // c, M)
    nv = valid.sum(1)
    sizes = cl.valid.view(B, -1, c).sum(-1)
    full = torch.arange(Np // c) < (nv // c)[:, None]
    assert (sizes[full] == c).all()   # balanced: every full cluster holds c real tokens
    for b in range(B):
        assert torch.equal(cl.order[b, cl.valid[b]].sort().values, valid[b].nonzero()[:, 0])
    ne = cl.valid.view(B, -1, c).any(-1)
    d = chosen_dist(cl.centres, cl.pos, cl.nbhd)
    assert torch.allclose(d[ne], brute_knn_dist(cl.centres, cl.pos, M, cl.valid)[ne], atol=1e-4)
    ok = cl.nbhd >= 0
    assert cl.valid.gather(1, cl.nbhd.clamp(min=0).flatten(1)).view_as(ok)[ok].all()   # padding never a neighbour
    assert (cl.nbhd[~ne] == -1).all()


def test_clusters_are_compact():
    "Hilbert clusters of a full grid are tight: mean member-to-centre distance well under the neighbourhood radius."
    ys, xs = torch.meshgrid(torch.arange(64.), torch.arange(64.), indexing='ij')
    p = torch.stack([xs, ys], -1).reshape(1, -1, 2)
    cl = cluster_tokens(p, None, 8, 64)
    r = (cl.pos.view(1, -1, 8, 2) - cl.centres[:, :, None]).norm(dim=-1).mean()
    assert r < 1.6, r


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match=r'pos must have shape \(B, N, 2\)'): cluster_tokens(torch.rand(2, 5))
    with pytest.raises(ValueError, match='valid must be a bool tensor'):
        cluster_tokens(torch.rand(2, 5, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match='different batch sizes'): knn(torch.rand(1, 3, 2), torch.rand(2, 3, 2), 2)
    with pytest.raises(ValueError, match=r'ds must be in \(0, 1\]'): TokenMerging(8, 8, ds=0.)
    enc = create_model('aff_mini')
    with pytest.raises(ValueError, match='not a multiple of the patch size'): enc(torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match='mask must be a bool tensor'):
        enc(torch.rand(1, 1, 64, 64), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match='img must have shape'): enc(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match='ds needs one rate per merge'): AFFEncoder(ds=(.4, .4))
    with pytest.raises(ValueError, match='unknown model'): create_model('nope')


def test_registry():
    @register_model(kind='encoder')
    def _tiny_test_model(**kw): return AFFEncoder(dims=(32, 32), depths=(1, 1), heads=(1, 1), **kw)
    assert '_tiny_test_model' in list_models()
    m = create_model('_tiny_test_model', nbhd=16)
    assert m.nbhd == 16 and {'aff_mini', 'aff_small', 'aff_base'} <= set(list_models('encoder'))
    assert m.arch == ('_tiny_test_model', dict(nbhd=16)) and m.kind == 'encoder'


def test_aff_base_param_count():
    with torch.device('meta'): m = create_model('aff_base')
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 65.6e6 - 1) < .1, n


def _batch(seed=0, size=128, ragged=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 1, size, size, generator=g)
    mask = perlin_mask(2, size // 8, .5, generator=g)
    if ragged: mask[1, :3] = True
    return img, mask


def test_token_counts_follow_ceil_ds_recursively():
    enc = create_model('aff_mini', ds=(.4, .5, .3)).eval()
    img, mask = _batch()
    with torch.no_grad(): outs = enc(img, mask)
    n = (~mask).flatten(1).sum(1)
    for s, o in enumerate(outs):
        assert torch.equal(o.valid.sum(1), n)
        assert torch.equal(o.valid, torch.arange(o.valid.shape[1]) < n[:, None])
        if s < 3: n = n_keep(n, enc.ds[s])


def test_padding_never_changes_real_tokens():
    torch.manual_seed(0)
    enc = create_model('aff_mini').eval()
    img, mask = _batch(1)
    with torch.no_grad():
        outs = enc(img, mask)
        for b in range(2):
            alone = enc(img[b:b+1], mask[b:b+1])
            for o, a in zip(outs, alone):
                k = int(a.valid.sum())
                assert torch.allclose(o.x[b, :k], a.x[0, :k], atol=1e-5)
                assert torch.allclose(o.pos[b, :k], a.pos[0, :k], atol=1e-5)
                assert (o.x[b, k:] == 0).all()
        # extra padding rows appended to the tokens change nothing either
        t = enc.embed(img, mask)
        pad = lambda z, v=0: torch.cat([z, torch.full((2, 11, *z.shape[2:]), v, dtype=z.dtype)], 1)
        padded = enc.forward_tokens(pad(t.x, 7.), pad(t.pos, 3.), pad(t.valid, False))
    for o, p in zip(outs, padded):
        k = o.valid.shape[1]
        assert torch.allclose(o.x, p.x[:, :k], atol=1e-5) and not p.valid[:, k:].any()


def test_outputs_equivariant_to_token_permutation():
    torch.manual_seed(1)
    enc = create_model('aff_mini').eval()
    img, mask = _batch(2)
    t = enc.embed(img, mask)
    perm = torch.randperm(t.x.shape[1])
    with torch.no_grad():
        a = enc.forward_tokens(*t)
        b = enc.forward_tokens(t.x[:, perm], t.pos[:, perm], t.valid[:, perm])
    for o1, o2 in zip(a, b):
        assert torch.allclose(o1.x, o2.x, atol=1e-5)
        assert torch.equal(o1.pos, o2.pos) and torch.equal(o1.valid, o2.valid)


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    enc = create_model('aff_mini').train()
    img, mask = _batch(3)
    sum(o.x.square().mean() for o in enc(img, mask)).backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert dead == []
    assert all(enc.merges[s].score[1].weight.grad.abs().sum() > 0 for s in range(3))


def test_torch_path_matches_float64():
    "impl='torch' in float32 against the same model in float64: same clustering, float32 rounding only."
    torch.manual_seed(3)
    m64 = create_model('aff_mini', impl='torch').double().eval()
    m32 = create_model('aff_mini', impl='torch').eval()
    m32.load_state_dict(m64.state_dict())
    img, mask = _batch(4)
    with torch.no_grad(): r64, r32 = m64(img.double(), mask), m32(img, mask)
    for a, b in zip(r32, r64):
        assert torch.equal(a.valid, b.valid) and rel(a.x, b.x) < 1e-4 and rel(a.pos, b.pos) < 1e-5


def test_bf16_autocast_cpu():
    torch.manual_seed(4)
    enc = create_model('aff_mini').train()
    img, mask = _batch(5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = enc(img, mask)
        loss = sum(o.x.float().square().mean() for o in outs)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    assert all(o.pos.dtype == torch.float32 for o in outs)


def test_aff_base_reduced_depth_512_perlin_fwd_bwd():
    "AFFMAE-Base widths at one block per stage, 2 × 512² images, 50 % Perlin masking: forward + backward on CPU."
    torch.manual_seed(5)
    enc = create_model('aff_base', depths=(1, 1, 1, 1), drop_path=.1)
    img = torch.rand(2, 1, 512, 512)
    mask = perlin_mask(2, 64, .5, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    outs = enc(img, mask)
    sum(o.x.square().mean() for o in outs).backward()
    dt = time.perf_counter() - t
    assert [int(n) for n in (o.valid.sum(1)[0] for o in outs)] == [2048, 820, 328, 132]
    assert [o.x.shape[-1] for o in outs] == [128, 256, 512, 768]
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    assert dt < 30, dt


def test_host_token_counts_match_synced_path():
    """`forward` carries the largest token count on the host (no sync per merge): same tokens as reading it from the
    GPU."""
    torch.manual_seed(0)
    enc = create_model('aff_mini').eval()
    img = torch.randn(2, 1, 128, 128)
    mask = perlin_mask(2, 16, .5, generator=torch.Generator().manual_seed(3))
    mask[1, :3] = True                                                   # ragged: image 1 hides more patches
    with torch.no_grad(): fast, synced = enc(img, mask), enc.forward_tokens(*enc.embed(img, mask))
    for a, b in zip(fast, synced):
        assert a.x.shape == b.x.shape and torch.equal(a.valid, b.valid)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.x, b.x)


def test_no_mask_is_all_visible():
    "`mask=None` embeds every patch, exactly as an all-False mask does."
    torch.manual_seed(0)
    enc = create_model('aff_mini').eval()
    img = torch.randn(2, 1, 64, 96)
    with torch.no_grad(): a, b = enc(img), enc(img, torch.zeros(2, 8, 12, dtype=torch.bool))
    for s, t in zip(a, b): assert torch.equal(s.x, t.x) and torch.equal(s.pos, t.pos) and torch.equal(s.valid, t.valid)
