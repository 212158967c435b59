"""Refresh notebooks' stored outputs, figures included, the way the docs need them.

    python tests/execute_nbs.py nbs/11_benchmarks.ipynb nbs/12_real_em.ipynb

Runs every cell (flagged ones too: an explorer's first frame is a figure the docs show) in nbdev's own shell (execnb)
with matplotlib's inline backend, drops stderr streams (warnings, progress bars), then `nbdev_clean`s the file, each
notebook in its own process. Do not set `MPLBACKEND` (say, to `Agg`) for this: a non-interactive backend keeps the
text outputs and silently drops every figure, which `tests/test_nb_figures.py` then reports. A cell that raises stops
the notebook, which is left as it was."""
import os, subprocess, sys
from pathlib import Path


def execute(path):
    "Execute notebook `path` in place (cwd: its folder), without stderr outputs, then clean it."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    path = Path(path).resolve()
    nb, cwd = read_nb(path), os.getcwd()
    os.chdir(path.parent)
    try: CaptureShell(path=path.parent, mpl_format='png').run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
    stderr = lambda o: o.get('output_type') == 'stream' and o.get('name') == 'stderr'
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = [o for o in c.get('outputs', []) if not stderr(o)]
    write_nb(nb, path)
    subprocess.run(['nbdev_clean', '--fname', str(path)], check=True)


if __name__ == '__main__':
    backend = os.environ.get('MPLBACKEND')
    if backend: sys.exit(f"MPLBACKEND={backend} would drop every figure: unset it")
    if len(sys.argv) < 2: sys.exit(__doc__)
    if len(sys.argv) > 2:                    # a process a notebook, as in Jupyter: no module state reaches the next
        for p in sys.argv[1:]:
            if rc := subprocess.run([sys.executable, __file__, p]).returncode: sys.exit(rc)
        sys.exit()
    p = sys.argv[1]
    if not Path(p).is_file(): sys.exit(f"{p}: no such notebook")
    try: execute(p)
    except Exception as e: sys.exit(f"{p}: a cell raised {type(e).__name__}: {(str(e) or ' ').splitlines()[0]}")
    print('executed', p)
