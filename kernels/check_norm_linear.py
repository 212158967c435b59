"""GPU check of affmae.mlp's `norm_linear` and `Mlp(x, norm)`: a LayerNorm and the layer after it as one op that keeps
x̂ alone and folds the norm's affine into the weight gradient, against the unfused pair (`LayerNorm` then the layer).

Per shape (rows, C) of the encoders, for LayerNorm → Linear(C, 3C) (a qkv projection) and LayerNorm → Mlp(C, 4C, C),
fp32 input under bf16 autocast: the relative errors ||a-b||/||b|| of the output and of every gradient (x, the norm's
weight and bias, the layer's weights and biases) against float64, fused and unfused; the median time of forward +
backward replayed from a CUDA graph; the peak memory of forward + backward; whether the fused replay equals its eager
run bit for bit (a capture that fails is recorded, and the eager step timed instead). A fused error over twice the
unfused one (plus 1e-3) or a replay that differs is a failure (exit 1).
Usage: PYTHONPATH=. python kernels/check_norm_linear.py --out kernels/results [--tiny]
(--tiny: small shapes, a CPU smoke run; without a GPU it sets TRITON_INTERPRET=1 and skips timing and memory)."""
import copy, datetime, sys, time
import torch, torch.nn as nn
from check_layer_norm import check_args, finish, timed, peak_mb, graphed

SHAPES = [(65536, 128), (32768, 256), (16384, 512), (8192, 768), (4096, 384)]
TINY = [(37, 24), (64, 32)]
BF16 = torch.bfloat16


def pair(mlp_mod, ln_mod, kind, C, dev, seed=0):
    "A LayerNorm (weight and bias away from 1, 0) and the layer after it, on `dev`, with fixed random weights."
    torch.manual_seed(seed)
    norm = ln_mod.LayerNorm(C, impl='triton').to(dev)
    layer = (nn.Linear(C, 3 * C) if kind == 'linear' else mlp_mod.Mlp(C, 4 * C, C)).to(dev)
    with torch.no_grad(): norm.weight.normal_(1, .1), norm.bias.normal_(0, .1)
    return norm, layer


def run(mlp_mod, norm, layer, fused, x, dy, dev, amp=True):
    "Output, then the gradients of x and of every parameter of the norm and the layer."
    params = [*norm.parameters(), *layer.parameters()]
    with torch.autocast(dev, dtype=BF16, enabled=amp):
        if not fused: y = layer(norm(x))
        else: y = layer(x, norm) if isinstance(layer, mlp_mod.Mlp) else mlp_mod.norm_linear(norm, layer, x)
    return (y, *torch.autograd.grad(y, (x, *params), dy.to(y.dtype)))


def reference(norm, layer, x, dy):
    "The float64 values: plain PyTorch LayerNorm and the layer in float64."
    n64 = nn.LayerNorm(norm.weight.shape[0], eps=norm.eps).double().to(x.device)
    n64.load_state_dict(norm.state_dict())
    l64 = (nn.Linear(layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else
           nn.Sequential(nn.Linear(layer[0].in_features, layer[0].out_features), nn.GELU(),
                         nn.Linear(layer[2].in_features, layer[2].out_features))).double().to(x.device)
    l64.load_state_dict(layer.state_dict())
    xr = x.detach().double().requires_grad_()
    y = l64(n64(xr))
    return (y, *torch.autograd.grad(y, (xr, *n64.parameters(), *l64.parameters()), dy.double()))


def main():
    a, dev = check_args(__doc__, 'check_norm_linear.json')
    import affmae.mlp as mlp_mod, affmae.layer_norm as ln_mod
    t0, cases, failed = time.time(), [], False
    for R, C in (TINY if a.tiny else SHAPES):
        for kind in ('linear', 'mlp'):
            norm, layer = pair(mlp_mod, ln_mod, kind, C, dev)
            g = torch.Generator(device=dev).manual_seed(1)
            x = (torch.randn(R, C, device=dev, generator=g) * 2 + .5).requires_grad_()
            out_c = 3 * C if kind == 'linear' else C
            dy = torch.randn(R, out_c, device=dev, generator=g).to(BF16)
            ref = reference(norm, layer, x, dy)
            names = ['y', 'dx', 'norm.dw', 'norm.db'] + [f'layer.{n}' for n, _ in layer.named_parameters()]
            rel, ms, mb, equal, capture_error = {}, {}, {}, None, {}
            for fused in (False, True):
                key = 'fused' if fused else 'unfused'
                got = run(mlp_mod, norm, layer, fused, x, dy, dev)
                rel[key] = {n: ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
                            for n, o, r in zip(names, got, ref)}
                if dev != 'cuda': continue
                # fresh leaves for the capture: leaves used on the default stream before would be stale there
                nc, lc, xc = copy.deepcopy(norm), copy.deepcopy(layer), x.detach().clone().requires_grad_()
                step = lambda: run(mlp_mod, nc, lc, fused, xc, dy, dev)
                try: graph, static = graphed(step)
                except Exception as e:                                   # recorded; the eager time stands in
                    capture_error[key] = str(e).splitlines()[0]
                    torch.cuda.synchronize()
                    graph = static = None
                ms[key] = timed(step if graph is None else graph.replay, dev, 20, 3)
                if fused and graph is not None: equal = all(torch.equal(s, e) for s, e in zip(static, step()))
                mb[key] = peak_mb(step)
                del graph, static
            ok = all(rel['fused'][n] <= 2 * rel['unfused'][n] + 1e-3 for n in names) and equal is not False
            failed |= not ok
            cases.append(dict(rows=R, C=C, layer=kind, rel_err=rel, ms_fwd_bwd_graph=ms or None, peak_mb=mb or None,
                              graph_replay_equals_eager=equal, capture_error=capture_error or None, ok=ok))
            worst = {k: max(v.values()) for k, v in rel.items()}
            line = (f"{R:>7} x {C:<4} {kind:>6}: worst rel err unfused {worst['unfused']:.1e} "
                    f"fused {worst['fused']:.1e}")
            if ms: line += (f" | graph ms {ms['unfused']:.3f} / {ms['fused']:.3f} ({ms['unfused'] / ms['fused']:.2f}x)"
                            f" | peak MB {mb['unfused']:.0f} / {mb['fused']:.0f}  replay = eager: {equal}")
            print(line + ('' if ok else '  FAIL') + (f'  capture failed: {capture_error}' if capture_error else ''))
    res = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (Triton interpreter)',
               torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec='seconds'),
               command=' '.join(sys.argv), dtypes='fp32 input and parameters, bf16 autocast, bf16 output gradient',
               timing='median of 20 replays after 3 of forward+backward captured in a CUDA graph '
                      '(eager calls where the capture failed: capture_error)',
               baseline='the unfused pair: affmae LayerNorm (Triton) then nn.Linear / Mlp, under autocast',
               cases=cases, seconds=round(time.time() - t0, 1))
    finish(a.out, 'check_norm_linear.json', res, failed)


if __name__ == '__main__':
    main()
