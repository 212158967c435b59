"""Every notebook cell that draws a figure has that figure stored, so the docs built from the notebooks show it.

A notebook executed with a non-interactive matplotlib backend (`MPLBACKEND=Agg`) keeps its text outputs and silently
drops every figure; the docs then lose their plots without any other check failing. A cell *draws* when it calls
`plt.show()` or `plt.subplots(`, or calls a `plot_…`, `show_figure` or `show_batch` at the start of a line; cells
that only define functions or are exported (library code), and cells flagged `notest`, `gpu`, `slow` or `eval: false`
(never run for the docs), are left out. Re-execute a failing notebook with `python tests/execute_nbs.py NOTEBOOK`
(nbdev's shell, the inline backend) to store its figures."""
import json, re
from pathlib import Path
import pytest

NBS = sorted((Path(__file__).resolve().parent.parent / 'nbs').glob('*.ipynb'))
DRAWS = re.compile(r"plt\.show\(\)|plt\.subplots\(|^\s*(?:plot_\w+|show_figure|\w+\.show_batch)\(", re.M)
NOT_RUN = re.compile(r"^#\|\s*(?:notest|gpu|slow|eval:\s*false|exports?)\b", re.M)


def drawing_cells_without_figures(nb):
    "(index, first line) of `nb`'s code cells that draw but store no image."
    out = []
    for i, c in enumerate(nb['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or not DRAWS.search(src) or NOT_RUN.search(src): continue
        body = [l for l in src.splitlines() if l.strip() and not l.startswith('#|')]
        if body and all(l.startswith(('def ', 'class ', '@', ' ', '\t', ')')) for l in body): continue  # definitions
        if not any(k.startswith('image/') for o in c.get('outputs', []) for k in o.get('data', {})):
            out.append((i, body[0][:80] if body else ''))
    return out


def test_detects_a_lost_figure():
    cell = lambda src, outs: dict(cell_type='code', source=[src], outputs=outs)
    img = [dict(output_type='display_data', data={'image/png': 'iVBOR'})]
    nb = dict(cells=[cell('fig, ax = plt.subplots()\nax.plot([1, 2])', img),
                     cell('plot_scores(res); plt.show()', []),
                     cell('#| notest\nplot_scores(res)', []),
                     cell('#| export\nN = 2\nclass L:\n    def show(self): fig, ax = plt.subplots()', []),
                     cell('def plot_x(ax):\n    fig, ax = plt.subplots()', [])])
    assert drawing_cells_without_figures(nb) == [(1, 'plot_scores(res); plt.show()')]


@pytest.mark.parametrize('path', NBS, ids=[p.name for p in NBS])
def test_figures_stored(path):
    missing = drawing_cells_without_figures(json.loads(path.read_text()))
    assert not missing, f"{path.name}: cells that draw but store no figure (run tests/execute_nbs.py on it): {missing}"
