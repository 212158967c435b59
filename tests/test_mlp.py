"""`Mlp` keeps less for the backward pass and changes nothing else: random shapes against `nn.Sequential` and
float64, and a whole AFFMAE model whose MLPs are swapped back to `nn.Sequential` gives the same loss and gradients
while storing more."""
import copy, os
import pytest, torch, torch.nn as nn
from affmae.mlp import Linear, Mlp, norm_linear
from affmae.layer_norm import LayerNorm, column_sum, triton
from affmae.registry import create_model


class PlainMlp(nn.Sequential):
    "An `nn.Sequential` that takes `Mlp`'s `norm` too, running it as a module of its own."
    def forward(self, x, norm=None): return super().forward(x if norm is None else norm(x))


def plain(m: Mlp) -> nn.Sequential:
    "The `nn.Sequential` with `m`'s weights."
    f1, f2 = m[0], m[2]
    s = PlainMlp(nn.Linear(f1.in_features, f1.out_features), nn.GELU(),
                      nn.Linear(f2.in_features, f2.out_features, bias=f2.bias is not None))
    s.load_state_dict(m.state_dict())
    return s


def run(model, x, dtype=None):
    "Output and every gradient (input first) of `model(x)` for a fixed upstream gradient; CPU autocast if `dtype`."
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return [y, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize('seed', range(6))
def test_random_shapes_match_sequential_and_float64(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    d_in, hid, d_out, rows = r(1, 20), r(1, 40), r(1, 9), r(0, 13)
    torch.manual_seed(seed)
    m = Mlp(d_in, hid, d_out, bias_out=seed % 2 == 0, keep_hidden=seed % 3 != 0)
    x = torch.randn(2, rows, d_in, generator=g)
    for a, b in zip(run(m, x), run(plain(m), x)): assert torch.equal(a, b)
    for a, b in zip(run(m, x), run(plain(m).double(), x.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    for dt in (torch.bfloat16, torch.float16):
        ours, ref = run(m, x, dt), run(plain(m), x, dt)
        assert ours[0].dtype == dt and all(p.grad.dtype == torch.float32 for p in m.parameters())
        for a, b in zip(ours, ref): torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_bad_width():
    with pytest.raises(ValueError, match='expects 4 input features'): Mlp(4, 8, 2)(torch.randn(3, 5))


class PreNorm(nn.Module):
    "`layer(norm(x))`: fused (`norm_linear`, `Mlp(x, norm)`) or as separate modules."
    def __init__(self, norm, layer, fused):
        super().__init__()
        self.norm, self.layer, self.fused = norm, layer, fused
    def forward(self, x):
        if not self.fused: return self.layer(self.norm(x))
        return self.layer(x, self.norm) if isinstance(self.layer, Mlp) else norm_linear(self.norm, self.layer, x)


@pytest.mark.parametrize('seed', range(4))
def test_norm_in_front_matches_separate_modules(seed):
    "`norm_linear(norm, lin, x)` and `Mlp(x, norm)` against `lin(norm(x))`, `mlp(norm(x))`: float32, float64, bf16."
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    C, rows = r(2, 40), r(0, 13)
    torch.manual_seed(seed)
    x = torch.randn(2, rows, C, generator=g) * 2 + 1
    for layer in (nn.Linear(C, r(1, 20)), Mlp(C, r(1, 40), r(1, 9), keep_hidden=seed % 2 == 0)):
        ln = LayerNorm(C)
        with torch.no_grad(): ln.weight.normal_(); ln.bias.normal_()
        fused, unfused = PreNorm(ln, layer, True), PreNorm(ln, layer, False)
        for a, b in zip(run(fused, x), run(unfused, x)): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        f64, u64 = copy.deepcopy(fused).double(), copy.deepcopy(unfused).double()
        for a, b in zip(run(f64, x.double()), run(u64, x.double())):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        if triton and os.environ.get('TRITON_INTERPRET') == '1': ln.impl = 'triton'
        ours, theirs = run(fused, x, torch.bfloat16), run(unfused, x, torch.bfloat16)
        assert torch.equal(ours[0], theirs[0])
        for a, b in zip(ours[1:], theirs[1:]): assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6   # bf16 roundings


@pytest.mark.parametrize('seed', range(4))
def test_linear_matches_nn_linear(seed):
    "`Linear` against `nn.Linear` with the same weights: random widths, rows (none too), with and without a bias."
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    d_in, d_out, rows, bias = r(1, 40), r(1, 40), r(0, 13), seed % 2 == 0
    ours = Linear(d_in, d_out, bias=bias)
    ref = nn.Linear(d_in, d_out, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, rows, d_in, generator=g)
    for a, b in zip(run(ours, x), run(ref, x)): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(run(copy.deepcopy(ours).double(), x.double()), run(copy.deepcopy(ref).double(), x.double())):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    ours_bf, ref_bf = run(ours, x, torch.bfloat16), run(ref, x, torch.bfloat16)
    assert torch.equal(ours_bf[0], ref_bf[0]) and ours_bf[0].dtype == torch.bfloat16
    assert all(a.dtype == torch.float32 for a in ours_bf[1:])
    for a, b in zip(ours_bf[1:], ref_bf[1:]): assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6   # bf16 roundings


@pytest.mark.parametrize('gemv', [False, True])
def test_column_sum_against_float64(gemv):
    "`column_sum` both ways (the GEMV path runs on the CPU too when asked), on random shapes and dtypes."
    g = torch.Generator().manual_seed(int(gemv))
    for _ in range(6):
        R, C = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            t = (torch.randn(R, C + 1, generator=g) * 3).to(dt)
            s = column_sum(t, gemv)
            assert s.dtype == dt and s.shape == (C + 1,)
            ref = t.double().sum(0)
            assert (s.double() - ref).abs().max() <= tol * max(1., ref.abs().max().item())


def saved_bytes(f):
    "Bytes of the activations stored for the backward pass while `f()` runs (parameters counted too)."
    total = [0]
    def pack(t): total[0] += t.numel() * t.element_size(); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): out = f()
    return out, total[0]


def test_affmae_same_step_less_memory():
    "affmae_tiny with its `Mlp`s against a copy whose MLPs are plain `nn.Sequential`s: same loss and gradients."
    torch.manual_seed(0)
    model = create_model('affmae_tiny')
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, Mlp): setattr(mod, child, plain(sub))
    assert not any(isinstance(m, Mlp) for m in twin.modules()) and any(isinstance(m, Mlp) for m in model.modules())
    img = torch.randn(2, 1, 64, 64)
    mask = model.make_mask(img, torch.Generator().manual_seed(0))
    losses = []
    for mdl in (model, twin):
        loss, nbytes = saved_bytes(lambda: mdl(img, mask)['loss'])
        loss.backward()
        losses.append((loss, nbytes, [p.grad for p in mdl.parameters()]))
    (l1, b1, g1), (l2, b2, g2) = losses
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert b1 < b2, (b1, b2)
