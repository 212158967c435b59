"""Fault injection (issue 12): a tiny `affmae pretrain` killed (SIGKILL) at random points, during steps and during
checkpoint saves, and resumed each time, must end with exactly the weights of an uninterrupted run.

    python tests/fault_injection.py [--kills 10] [--epochs 16] [--seed 0] [--dir DIR]

Each run is a fresh `python` process running the `affmae pretrain` command, with two test hooks patched in: every
training step and every checkpoint file written (before its rename) is logged to an events file beside the run
folder, and each save then pauses `--save-delay` seconds, a window that a kill can land in."""
import argparse, os, random, signal, subprocess, sys, tempfile, time
from pathlib import Path

ARGS = ['pretrain', '--arch', 'affmae_tiny', '--img-size', '32', '--bs', '4', '--n-synth', '8', '--epoch-len', '16',
        '--precision', 'none', '--lr', '2e-3', '--warmup', '.25', '--seed', '0']


def child(out: Path, epochs: int, save_delay: float):
    "One process of the run in `out`: resume from its checkpoints if it has any, else start it."
    import torch; torch.set_num_threads(1)
    import affmae.learner as L, affmae.checkpoint as CK
    from affmae.cli import main
    ev = open(out.parent / f'{out.name}.events', 'a')
    def log(s): ev.write(s + '\n'); ev.flush()
    real = CK.save_file
    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)          # the temporary file, not yet renamed
        log('save'); time.sleep(save_delay)
    CK.save_file = slow_save
    L.Checkpoint.after_batch = lambda self: log('step') if self.training else None
    ck = out / 'checkpoints'
    more = ['--resume', str(ck)] if L.run_ids(ck) else ['--overwrite']
    sys.exit(main(ARGS + ['--epochs', str(epochs), '--out', str(out)] + more))


def launch(out: Path, a) -> subprocess.Popen:
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    cmd = [sys.executable, __file__, '--child', str(out), '--epochs', str(a.epochs), '--save-delay', str(a.save_delay)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def events(out: Path) -> list[str]:
    f = out.parent / f'{out.name}.events'
    return f.read_text().split() if f.exists() else []


def kill_at(p: subprocess.Popen, out: Path, kind: str, n: int, rng: random.Random, delay: float) -> bool:
    "SIGKILL `p` at its `n`-th step or save (counted from now); False if it finished first."
    start = events(out).count(kind)
    while p.poll() is None:
        if events(out).count(kind) - start >= n:
            time.sleep(rng.uniform(0, delay if kind == 'save' else .05))
            p.send_signal(signal.SIGKILL); p.wait()
            return True
        time.sleep(.01)
    return False


def main(a):
    import torch
    from safetensors.torch import load_file
    from affmae.checkpoint import checkpoints
    rng, root = random.Random(a.seed), Path(a.dir or tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    ref, run = root / 'reference', root / 'faulted'
    t0 = time.time()
    p_ref = launch(ref, a)                                              # the uninterrupted run, alongside
    kills = dict(step=0, save=0)
    for i in range(a.kills):
        kind = 'save' if i % 2 else 'step'
        n = rng.randint(2, 4) if kind == 'save' else rng.randint(1, 6)  # its 2nd save ends a process's 1st epoch
        p = launch(run, a)
        if not kill_at(p, run, kind, n, rng, a.save_delay): sys.exit(f"FAIL: the run ended before kill {i + 1}")
        kills[kind] += 1
        ck = checkpoints(run / 'checkpoints')
        print(f"kill {i + 1:2d} during a {kind:4s} ({time.time() - t0:5.1f} s); newest checkpoint: "
              f"{ck[0].name if ck else 'none yet'}", flush=True)
    last = f'epoch_{a.epochs - 1:03d}.safetensors'
    p = launch(run, a)
    if p.wait() != 0: sys.exit(f"FAIL: the resumed run exited {p.returncode}: {p.stderr.read()}")
    if p_ref.wait() != 0: sys.exit(f"FAIL: the reference run exited {p_ref.returncode}: {p_ref.stderr.read()}")
    for name in (last, last.replace('.safetensors', '.state.safetensors')):
        w, w_ref = load_file(str(run / 'checkpoints' / name)), load_file(str(ref / 'checkpoints' / name))
        if w.keys() != w_ref.keys() or not all(torch.equal(w[k], w_ref[k]) for k in w):
            sys.exit(f"FAIL: {name} differs from the uninterrupted run's")
    print(f"OK: {a.kills} kills ({kills['step']} during steps, {kills['save']} during saves), resumed each time; "
          f"{last} and its training state equal the uninterrupted run's ({time.time() - t0:.0f} s)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--kills', type=int, default=10)
    ap.add_argument('--epochs', type=int, default=16)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--save-delay', type=float, default=.3)
    ap.add_argument('--dir', default=None)
    ap.add_argument('--child', default=None)
    a = ap.parse_args()
    child(Path(a.child), a.epochs, a.save_delay) if a.child else main(a)
