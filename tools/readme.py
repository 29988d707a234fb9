"""Write README.md from nbs/index.ipynb, or with --check verify that it is up to date.

nbdev_readme needs Quarto, which cannot be installed on the project's machines; this renders the
same thing with the tools that are there: execnb executes the notebook, and its cells become
GitHub markdown (nbdev directives honoured: `#| hide`, `#| echo: false`, `#| output: false`).
"""
import argparse
import difflib
import os
import re
import sys
from pathlib import Path

from execnb.nbio import read_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parent.parent
HEADER = '<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->\n\n'


def _directives(src: str):
    "Split a code cell into its nbdev directives and the remaining source."
    lines, dirs = src.splitlines(), {}
    body = []
    for ln in lines:
        s = ln.strip()
        if s.startswith('#|'):
            k, _, v = s[2:].strip().partition(':')
            dirs[k.strip()] = v.strip() or True
        else: body.append(ln)
    return dirs, '\n'.join(body).strip('\n')


def _output_md(out) -> str:
    "Markdown for one cell output."
    if out.get('output_type') == 'stream': return '```\n' + ''.join(out['text']).rstrip('\n') + '\n```'
    if out.get('output_type') == 'error': raise RuntimeError('index.ipynb raised: ' + '\n'.join(out.get('traceback', [])))
    data = out.get('data', {})
    if 'text/markdown' in data: return ''.join(data['text/markdown']).strip('\n')
    if 'text/plain' in data: return '```\n' + ''.join(data['text/plain']).rstrip('\n') + '\n```'
    return ''


def github_links(md: str, nbs: Path = ROOT / 'nbs') -> str:
    "Links to pages of the docs site (`collators.html#x`) as links to their notebooks in the repository (`nbs/04_collators.ipynb#x`)."
    page = lambda p: re.sub(r'^\d+[a-zA-Z0-9]*_', '', p.name.lower())[:-len('.ipynb')] + '.html'   # nbdev's page name
    pages = {page(p): p.name for p in nbs.glob('*.ipynb')}
    return re.sub(r'\]\(([\w.-]+\.html)(#[^)\s]*)?\)',
                  lambda m: f"](nbs/{pages[m.group(1)]}{m.group(2) or ''})" if m.group(1) in pages else m.group(0), md)


def render_readme(nb_path: Path = ROOT / 'nbs' / 'index.ipynb') -> str:
    "Execute the index notebook and render it as GitHub markdown."
    nb = read_nb(nb_path)
    cwd = os.getcwd()
    os.chdir(nb_path.parent)
    try: CaptureShell(nb_path).run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            parts.append(cell.source.strip('\n'))
            continue
        dirs, body = _directives(cell.source)
        if 'hide' in dirs or 'default_exp' in dirs or not (body or cell.get('outputs')): continue
        if dirs.get('echo') != 'false' and body: parts.append('```python\n' + body + '\n```')
        if dirs.get('output') != 'false':
            parts += [m for m in (_output_md(o) for o in cell.get('outputs', [])) if m]
    return HEADER + github_links('\n\n'.join(p for p in parts if p), nb_path.parent) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help='fail if README.md differs from what index.ipynb renders')
    args = ap.parse_args()
    text, readme = render_readme(), ROOT / 'README.md'
    if args.check:
        old = readme.read_text(encoding='utf-8') if readme.exists() else ''
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), 'README.md', 'index.ipynb'))
            sys.exit('README.md is out of date with nbs/index.ipynb: run `make readme`')
        print('README.md matches nbs/index.ipynb')
    else:
        readme.write_text(text, encoding='utf-8')
        print(f'wrote {readme}')


if __name__ == '__main__':
    main()
