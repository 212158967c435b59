#!/usr/bin/env bash
# The whole test suite: the library matches the notebooks, the notebooks' tests pass, pytest passes,
# and every docs page renders and reads cleanly in headless Chromium (screenshots in _proc/_screens).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 MPLBACKEND=Agg PYTHONWARNINGS=ignore::DeprecationWarning

echo "== nbdev_export leaves affmae/ unchanged"
before=$(git status --porcelain -- affmae | md5sum)
nbdev_export
after=$(git status --porcelain -- affmae | md5sum)
if [ "$before" != "$after" ]; then
  git status --porcelain -- affmae; git diff --stat -- affmae
  echo "FAIL: affmae/ is out of sync with nbs/: run nbdev_export and commit"; exit 1
fi

echo "== README.md is generated from nbs/index.ipynb"
python tests/readme.py --check

echo "== notebook tests (nbdev_test's, a fresh process a notebook)"
python tests/notebooks.py --n_workers 2

echo "== pytest"
python -m pytest -q tests

echo "== docs: nbdev_proc_nbs, every page rendered like the Quarto site, then checked in headless Chromium"
rm -rf _proc
# nbdev_proc_nbs's own processing, minus its first step (install Quarto, then pip-install this package unpinned)
python -c "from nbdev.serve import proc_nbs; proc_nbs()"
npm install --no-save --no-audit --no-fund --loglevel=error --prefix _proc/_npm mathjax@3.2.2 >/dev/null
python tests/docs_render.py --mathjax _proc/_npm/node_modules/mathjax
# the site is _proc/_site (open index.html), one screenshot a page in _proc/_screens
python tests/docs_check.py
echo "ALL TESTS PASSED"
