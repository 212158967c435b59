"""Every result figure the README quotes is in the committed result file it cites.

A *figure* is a number in README.md's prose or tables that carries a unit (`ms`, `s`, `GiB`, `MiB`, `%`, or `×`
written right after it), or a decimal with two or more digits after the point (mIoU, losses).
Its *source* is the result file (`….json`, or every JSON in a cited `folder/`) named last before it in the README;
a figure with no source before it fails. A sign written before a figure (after a space or a bracket) is part of it.
It is *sourced* when that file holds it at the quoted precision:
a number that is not one of a list of raw samples (for `%`: also a fraction times 100); for a `×` figure, the ratio
of one field of two records of a list that differ only in `arch` (same `size`, `bs` and text fields: the
AFFMAE / ViT-MAE tables).
Settings, not results, are left out: code blocks and `code spans` (commands, options, file names), link targets,
image sides written with ² (256²), versions after Python/torch/triton, arXiv ids and dates.
So a figure typed by hand, or one whose result file changed, fails: render the README from the files
(`python tests/readme.py`) or delete the figure."""
import json, math, re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = r'(?:\s?(?:ms|s|GiB|MiB|%)(?![\w²])|×)'
SIGN = r'(?:(?<=[\s(])([-+−]))?'                   # a sign after a space or bracket (not a range's hyphen)
FIGURE = re.compile(rf'{SIGN}(?<![\w.,])(\d[\d,]*(?:\.\d+)?)({UNIT})|{SIGN}(?<![\w.,])(\d+\.\d{{2,}})(?![\w.²])')
SETTINGS = [r'```.*?```', r'`[^`\n]*`', r'\]\([^)]*\)', r'\d+(?:\.\d+)?²', r'(?:Python|torch|triton)\s+\d[\w.+]*',
            r'arXiv\s+\d+\.\d+', r'\d{4}-\d{2}-\d{2}']
SOURCE = re.compile(r'((?:nbs|kernels)/[\w./-]*?(?:\.json|/))(?=[`\s)])')


def figures(text):
    "(quoted string, value, decimals, position) of every figure in markdown `text`."
    for pat in SETTINGS: text = re.sub(pat, lambda m: ' ' * len(m.group()), text, flags=re.S)
    for m in FIGURE.finditer(text):
        sign, s = m.group(1) or m.group(4) or '', m.group(2) or m.group(5)
        value = float(s.replace(',', '')) * (-1 if sign in ('-', '−') else 1)
        yield sign + s + (m.group(3) or '').strip(), value, len(s.partition('.')[2]), m.start()


def _numbers(x):
    if isinstance(x, bool): return
    if isinstance(x, (int, float)): yield x
    elif isinstance(x, dict):
        for v in x.values(): yield from _numbers(v)
    elif isinstance(x, list):                      # lists of records; lists of bare numbers are raw samples
        for v in x:
            if isinstance(v, (dict, list)): yield from _numbers(v)


def _lists(x):
    if isinstance(x, list): yield x
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else []): yield from _lists(v)


def _ratios(records):
    "a/b of each numeric field of two records that differ only in `arch` (and in their measurements)."
    def ident(r): return sorted((k, v) for k, v in r.items() if k != 'arch' and (isinstance(v, (str, type(None)))
                                                                               or k in ('size', 'bs')))
    recs = [r for r in records if isinstance(r, dict) and 'arch' in r]
    for a in recs:
        for b in recs:
            if a is b or a['arch'] == b['arch'] or ident(a) != ident(b): continue
            for k, v in a.items():
                w = b.get(k)
                if isinstance(v, float) and isinstance(w, (int, float)) and w: yield v / w


def sourced_values(files):
    "The numbers figures may quote from `files`, by kind: 'value', 'percent' (values and fractions ×100), 'ratio'."
    vals, ratios = set(), set()
    for f in files:
        d = json.loads(Path(f).read_text())
        vals.update(float(v) for v in _numbers(d))
        for lst in _lists(d): ratios.update(_ratios(lst))
    return dict(value=sorted(vals), percent=sorted(vals | {100 * v for v in vals}), ratio=sorted(ratios))


def _kind(s): return 'ratio' if s.endswith('×') else 'percent' if s.endswith('%') else 'value'


def _files(cited, root):
    p = root / cited
    return sorted(p.glob('*.json')) if cited.endswith('/') else [p]


def unsourced(text, root=ROOT):
    "The figures of `text` that the result file cited last before them does not give at their quoted precision."
    cites = [(m.start(), m.group(1)) for m in SOURCE.finditer(text)]
    bad, cache = [], {}
    for s, x, dec, at in figures(text):
        cited = [c for pos, c in cites if pos < at]
        if not cited:
            bad.append(f'{s} (no result file cited before it)')
            continue
        src = cache.setdefault(cited[-1], sourced_values(_files(cited[-1], root)))
        tol = 0.5 * 10**-dec * (1 + 1e-9)
        if not any(abs(v - x) <= tol for v in src[_kind(s)] if math.isfinite(v)): bad.append(f'{s} ({cited[-1]})')
    return bad


def test_parser_finds_figures_and_skips_settings():
    text = ("0.72× and 2 % idle, 122 ms and 8.9 GiB, mIoU 0.803; `--lr 1.5e-4`, 512², torch 2.11.0, Python 3.11, "
            "arXiv 2602.16249, 2026-11-22, [x](a/0.55.png), 8 × 8,192 tokens\n```sh\nrun --bs 0.25\n```")
    assert [s for s, *_ in figures(text)] == ['0.72×', '2%', '122ms', '8.9GiB', '0.803']
    signed = list(figures('moves it by -0.017, +0.032 (−0.073) over 0.631-0.741'))
    assert [(s, v) for s, v, *_ in signed] == [('-0.017', -.017), ('+0.032', .032), ('−0.073', -.073),
                                               ('0.631', .631), ('0.741', .741)]


def test_a_typed_figure_fails(tmp_path):
    recs = [dict(arch='a', size=8, bs=2, img_per_s=5.0, idle=0.0208), dict(arch='v', size=8, bs=2, img_per_s=3.0)]
    (tmp_path / 'kernels').mkdir()
    (tmp_path / 'kernels/r.json').write_text(json.dumps(dict(miou=0.8029713828442849, records=recs)))
    good = 'From `kernels/r.json`: 0.803 mIoU, 2 % idle, 1.67× faster.'
    assert unsourced(good, tmp_path) == []
    assert unsourced(good.replace('0.803 mIoU', '-0.803 mIoU'), tmp_path) == ['-0.803 (kernels/r.json)']
    assert unsourced('0.803 mIoU before any source; ' + good.replace('0.803', '0.813').replace('1.67', '1.76'),
                     tmp_path) == ['0.803 (no result file cited before it)', '0.813 (kernels/r.json)',
                                   '1.76× (kernels/r.json)']


def test_readme_figures_are_in_result_files():
    readme = (ROOT / 'README.md').read_text()
    assert len(list(figures(readme))) > 10           # the bench table and the segmentation line are parsed
    bad = unsourced(readme)
    assert bad == [], f'README.md quotes figures its cited result files do not hold: {bad}'
