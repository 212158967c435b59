"""The house rules the index's Developing section states, checked on the exported modules: one job per module, under
500 lines (nbdev's symbol index `_modidx.py` aside), and lines of at most 120 characters (the first line of a module's
`__all__` aside, which nbdev writes wrapped at 120 before prefixing `__all__ = `); and the same line length in the
notebooks' code cells, where the modules come from, and in the scripts beside them (`kernels/`, `tests/`)."""
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in (ROOT / 'affmae').glob('*.py') if p.name != '_modidx.py')


@pytest.mark.parametrize('path', MODULES, ids=[p.name for p in MODULES])
def test_module_size_and_lines(path):
    lines = path.read_text().splitlines()
    assert len(lines) < 500, f"{path.name}: {len(lines)} lines (split it: one job per module)"
    long = [i + 1 for i, l in enumerate(lines) if len(l) > 120 and not l.startswith('__all__ = ')]
    assert not long, f"{path.name}: lines longer than 120 characters: {long}"


NOTEBOOKS = sorted((ROOT / 'nbs').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_lines(path):
    cells = json.loads(path.read_text())['cells']
    long = [(i, len(l)) for i, c in enumerate(cells) if c['cell_type'] == 'code'
            for l in ''.join(c['source']).splitlines() if len(l) > 120]
    assert not long, f"{path.name}: code lines longer than 120 characters (cell, length): {long}"


SCRIPTS = sorted(p for d in ('kernels', 'tests') for ext in ('py', 'sh') for p in (ROOT / d).rglob(f'*.{ext}'))


@pytest.mark.parametrize('path', SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_script_lines(path):
    long = [i + 1 for i, l in enumerate(path.read_text().splitlines()) if len(l) > 120]
    assert not long, f"{path.relative_to(ROOT)}: lines longer than 120 characters: {long}"
