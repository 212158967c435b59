"""Load every page of the rendered docs site in headless Chromium (Debian's chromium + chromium-driver) and fail, one
line per problem, on: error output (stderr or tracebacks), JavaScript errors or failed loads in the console, raw
`#|` directives, `$` math MathJax left untypeset or could not parse, Quarto markup left as text, broken images,
links to local files or anchors that do not exist, a missing title block, and content wider than the window.
Saves a screenshot of each page's first screen.

    python tests/docs_check.py [--site _proc/_site] [--screens _proc/_screens]"""
import argparse, functools, http.server, re, shutil, sys, tempfile, threading
from pathlib import Path
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

root = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync', '--window-size=1400,1000']

# Runs in the page once MathJax is done; returns [[kind, detail], ...].
FIND_PROBLEMS = r"""
const out = [], clip = s => s.trim().split('\n')[0].slice(0, 100);
document.querySelectorAll('.cell-output-stderr, .cell-output-error').forEach(e => {
  const m = e.innerText.match(/\w*(Error|Warning|Exception)\b.*/);
  out.push(['error output', m ? clip(m[0]) : clip(e.innerText)]); });
document.querySelectorAll('img').forEach(i => { if (!i.complete || i.naturalWidth === 0)
  out.push(['broken image', i.getAttribute('src').slice(0, 100)]); });
document.querySelectorAll('mjx-merror').forEach(e =>
  out.push(['math error', e.getAttribute('data-mjx-error') || clip(e.textContent)]));
const page = document.documentElement;
if (page.scrollWidth > page.clientWidth)
  out.push(['too wide', `${page.scrollWidth}px content in a ${page.clientWidth}px window`]);
const title = document.querySelector('h1.title');
if (!title || !title.innerText.trim()) out.push(['no title', '']);
const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walk.nextNode(); n; n = walk.nextNode()) {
  const t = n.textContent, p = n.parentElement, inCode = p.closest('pre, code, script, style, mjx-container');
  const inlineCode = p.closest('code') && !p.closest('pre');
  if (/^\s*#\|/m.test(t) && !inlineCode) out.push(['raw directive', clip(t.match(/#\|.*/)[0])]);
  if (!inCode && (/\{(target|style|\.[\w-]+|#[\w-]+)[=\s}]/.test(t) || /^:::/m.test(t)))
    out.push(['Quarto markup', clip(t)]);
  if (!inCode && /\$\$|\$[^$\s][^$]*\$/.test(t)) out.push(['raw math', clip(t.match(/\$\$?[^$]*\$?\$?/)[0])]);
}
const files = [...document.querySelectorAll('[href], [src]')].map(e => e.getAttribute('href') || e.getAttribute('src'))
  .filter(u => u !== '#' && !/^[a-z]+:/.test(u));
return [out, files];
"""

def serve(site):
    "A localhost HTTP server for `site` on a free port, in a daemon thread."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv

def browser(profile):
    "Debian's Chromium, headless, driven through its ChromeDriver, with a fresh profile and the console recorded."
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists(): sys.exit(f'docs_check: no {exe}: apt-get install chromium chromium-driver')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(f)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)

@functools.cache
def ids_in(page):
    "The element ids of a rendered page: the anchors its links may point to."
    return set(re.findall(r'\sid="([^"]+)"', page.read_text()))

def check_page(driver, base, site, page, screens):
    "Problems on one page, as 'page: kind: detail' lines; saves its screenshot."
    driver.get(f'{base}/{page.name}')
    typeset = driver.execute_async_script("const done = arguments[arguments.length - 1];"
        "window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => document.fonts.ready)"
        ".then(() => done(true), () => done(false)) "
        ": done(false);")
    found, files = driver.execute_script(FIND_PROBLEMS)
    if not typeset: found.append(['MathJax', 'did not load or failed'])
    found += [['console', e['message'][:160]] for e in driver.get_log('browser') if e['level'] == 'SEVERE']
    for link in sorted(set(files)):
        url = urlsplit(link)
        target = site/(url.path or page.name)
        if not target.is_file(): found.append(['broken link', link])
        elif url.fragment and target.suffix == '.html' and url.fragment not in ids_in(target):
            found.append(['broken anchor', link])
    driver.save_screenshot(str(screens/f'{page.stem}.png'))
    source = driver.execute_script("const m = document.querySelector('meta[name=source]'); return m && m.content;")
    return [f'{page.name} ({source}): {kind}: {detail}' for kind, detail in found]

def check(site, screens):
    pages = sorted(site.glob('*.html'))
    if not pages: return [f'{site}: no pages (run tests/docs_render.py first)']
    if screens.exists(): shutil.rmtree(screens)
    screens.mkdir(parents=True)
    srv, profile = serve(site), tempfile.mkdtemp(prefix='docs_check_')
    driver = browser(profile)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(60)
    base = f'http://127.0.0.1:{srv.server_port}'
    try: return [p for page in pages for p in check_page(driver, base, site, page, screens)]
    finally:
        driver.quit()
        srv.shutdown()
        shutil.rmtree(profile, ignore_errors=True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--site', default=str(root/'_proc/_site'), help='the folder tests/docs_render.py wrote')
    ap.add_argument('--screens', default=str(root/'_proc/_screens'), help='where to save one screenshot per page')
    a = ap.parse_args()
    problems = check(Path(a.site), Path(a.screens))
    for p in problems: print(f'docs_check: {p}')
    n = len(list(Path(a.site).glob('*.html')))
    print(f'docs_check: {n} pages, {len(problems)} problems; screenshots in {a.screens}')
    sys.exit(1 if problems else 0)
