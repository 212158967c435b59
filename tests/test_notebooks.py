"`tests/notebooks.py` tests each notebook in a fresh process, skips flagged cells and reports a failing notebook."
import subprocess, sys
from pathlib import Path
from execnb.nbio import mk_cell, new_nb, write_nb

RUNNER = Path(__file__).parent / 'notebooks.py'


def notebook(path: Path, *sources: str) -> str:
    write_nb(new_nb([mk_cell(s) for s in sources]), path)
    return str(path)


def run(*args: str):
    return subprocess.run([sys.executable, str(RUNNER), '--n_workers', '1', *args],
                          capture_output=True, text=True, timeout=300)


def test_state_does_not_leak_between_notebooks(tmp_path):
    sets = notebook(tmp_path / 'a_sets.ipynb', 'import json\njson.left_by_a = 1')   # module state, as a registry's
    reads = notebook(tmp_path / 'b_reads.ipynb', "import json\nassert not hasattr(json, 'left_by_a')")
    r = run(sets, reads)                                            # one worker: nbdev_test would run both in it
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'a_sets.ipynb: ok' in r.stdout and 'b_reads.ipynb: ok' in r.stdout and '2 notebooks passed' in r.stdout


def test_flagged_cells_skipped_failures_reported(tmp_path):
    flagged = notebook(tmp_path / 'flagged.ipynb', "#| gpu\nraise RuntimeError('needs a GPU')", 'x = 1')
    failing = notebook(tmp_path / 'failing.ipynb', 'assert 1 == 2, "the notebook\'s own test"')
    r = run(flagged, failing)
    assert r.returncode == 1
    assert 'flagged.ipynb: ok' in r.stdout and 'failing.ipynb: FAILED' in r.stdout
    assert "the notebook's own test" in r.stderr and 'notebook tests failed: failing.ipynb' in r.stderr
    r = run('--flags', 'gpu', flagged)                                          # named flags run
    assert r.returncode == 1 and 'needs a GPU' in r.stderr


def test_missing_notebook_is_one_line(tmp_path):
    r = run(str(tmp_path / 'nowhere.ipynb'))
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'nowhere.ipynb'}: no such notebook"
