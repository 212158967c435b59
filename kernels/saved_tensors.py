"""What a training step keeps for its backward, by module: the tensors autograd saves in the forward (hooked with
`saved_tensors_hooks`), each storage counted once, parameters left out, autocast's casts of the weights counted apart
('weight casts'). Runs on the CPU under bf16 autocast with the Triton kernels in the interpreter (TRITON_INTERPRET=1),
so the saved tensors are the GPU path's; transients and the optimizer's state are not in it.
Usage: TRITON_INTERPRET=1 PYTHONPATH=. python kernels/saved_tensors.py --archs affmae_base,vitmae_base --size 256 \
         --bs 4 --out kernels/results/saved_tensors.json"""
import argparse, collections, json, os, re, time
os.environ.setdefault('TRITON_INTERPRET', '1')   # before the kernels are defined
import torch
from affmae.registry import create_model
from affmae.layer_norm import LayerNorm

def saved_by_module(arch, size, bs):
    """`{module path: bytes}` of one forward's saved tensors (block numbers as #; stage, merge and decoder layer kept),
    the weight casts' bytes under 'weight casts'."""
    torch.manual_seed(0)
    model = create_model(arch, **({'impl': 'triton'} if arch.startswith('affmae') else {}))
    for m in model.modules():
        if isinstance(m, LayerNorm): m.impl = 'triton'
    stack, acc, seen = [], collections.Counter(), set()
    for name, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, *a, n=name: stack.append(n))
        m.register_forward_hook(lambda *a: (stack.pop(), None)[1])                  # None: keep the output
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for p in model.parameters() if p.ndim == 2 for s in (tuple(p.shape), tuple(p.shape[::-1]))}
    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            where = re.sub(r'(?<!stages)(?<!merges)(?<!layers)\.\d+', '.#', stack[-1] if stack else '') or '(model)'
            acc['weight casts' if tuple(t.shape) in shapes else where] += t.untyped_storage().nbytes()
        return t
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(bs, 1, size, size))
    return dict(acc)

p = argparse.ArgumentParser()
p.add_argument('--archs', default='affmae_base,vitmae_base')
p.add_argument('--size', type=int, default=256)
p.add_argument('--bs', type=int, default=4)
p.add_argument('--out', default='runs/saved_tensors.json')
a = p.parse_args()
res = dict(command=f"TRITON_INTERPRET=1 python kernels/saved_tensors.py --archs {a.archs} --size {a.size} --bs {a.bs}",
           date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), torch=torch.__version__, size=a.size, bs=a.bs,
           archs={})
for arch in a.archs.split(','):
    by = saved_by_module(arch, a.size, a.bs)
    act = sum(v for k, v in by.items() if k != 'weight casts')
    res['archs'][arch] = dict(activations_mib=act / 2**20, weight_casts_mib=by.get('weight casts', 0) / 2**20,
                              by_module_mib={k: v / 2**20 for k, v in sorted(by.items(), key=lambda kv: -kv[1])})
    print(f"{arch} {a.size}² batch {a.bs}: {act / 2**20:.1f} MiB of activations saved "
          f"(+ {by.get('weight casts', 0) / 2**20:.1f} MiB of bf16 weight casts)")
    for k, v in list(res['archs'][arch]['by_module_mib'].items())[:12]: print(f"  {v:8.2f} MiB  {k}")
names = list(res['archs'])
if len(names) == 2:
    r = res['archs'][names[0]]['activations_mib'] / res['archs'][names[1]]['activations_mib']
    res['activation_ratio'] = r
    print(f"activations saved, {names[0]} / {names[1]}: {r:.2f}×")
os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
open(a.out, 'w').write(json.dumps(res, indent=1))
