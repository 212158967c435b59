"""The notebooks' tests as `nbdev_test` runs them, each notebook in a fresh process.

    python tests/notebooks.py [--n_workers N] [--flags slow] [NOTEBOOK ...]    # default: every notebook

`nbdev_test` reuses its worker processes, so module state one notebook sets (a model builder it registers from its
own cells, say) outlives it and reaches whichever notebook that worker runs next: a failure that depends on which
worker drew which notebook. A process a notebook, as in Jupyter (a kernel a notebook), keeps them apart. The same
notebooks and cells (settings.ini's `tst_flags` skipped unless `--flags` names them; `.notest` and `skip_exec`
honoured), the same error report; prints each notebook's seconds as it finishes."""
import argparse, sys, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path


def run_notebook(fn: Path, flags: str = ''):
    "Run notebook `fn`'s tests the way `nbdev_test` does, cells flagged with `flags` too: `(passed, seconds)`."
    from nbdev.config import get_config
    from nbdev.test import test_nb
    cfg = get_config()
    return test_nb(fn, skip_flags=cfg.tst_flags.split(), force_flags=flags.split(), basepath=cfg.config_path)


def notebooks(paths: list[str]) -> list[Path]:
    "The notebooks named, or, with none named, every one `nbdev_test` would test."
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    for p in paths:
        if not Path(p).is_file(): sys.exit(f"{p}: no such notebook")
    files = [Path(p) for p in paths] or [f for f in nbglob(as_path=True) if _keep_file(f, '.notest')]
    return sorted(f.absolute() for f in files)


def main(paths: list[str], n_workers: int = 2, flags: str = '') -> int:
    files, failed, start = notebooks(paths), [], time.time()
    ctx = get_context('spawn')                                   # no state of this process reaches a notebook
    with ProcessPoolExecutor(n_workers, mp_context=ctx, max_tasks_per_child=1) as ex:
        runs = {ex.submit(run_notebook, f, flags): f for f in files}
        for run in as_completed(runs):
            passed, secs = run.result()
            print(f"{runs[run].name}: {'ok' if passed else 'FAILED'} {secs:.0f} s", flush=True)
            if not passed: failed.append(runs[run].name)
    if failed:
        print(f"notebook tests failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return 1
    print(f"{len(files)} notebooks passed in {time.time() - start:.0f} s")
    return 0


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to test (default: every one)')
    ap.add_argument('--n_workers', type=int, default=2, help='notebooks tested at once')
    ap.add_argument('--flags', default='', help="space-separated flags of cells to run that are skipped by default")
    args = ap.parse_args()
    if args.n_workers < 1: sys.exit(f"--n_workers {args.n_workers}: need at least 1")
    sys.exit(main(args.notebooks, args.n_workers, args.flags))
