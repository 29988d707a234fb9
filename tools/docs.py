"""Build the docs site as HTML without Quarto: nbdev's own processors, then nbconvert.

`nbdev_docs` needs Quarto, which cannot be installed on the project's machines, and `nbdev_proc_nbs` must not
be run here either: it calls nbdev's `_ensure_quarto`, which tries to install Quarto and then runs
`pip install -e .[dev]` with whatever `pip` is first on PATH. This script runs the same notebook processors
in this process (front matter, `#| hide`, exported code moved out of the page, `show_doc` cells, doc links),
renders the `show_doc` cells from the library itself instead of re-running notebook cells, and writes one
page per notebook with the sidebar of `nbs/sidebar.yml`. Page names and heading anchors are the ones the
real site gets (`04_collators.ipynb` -> `collators.html`, headings -> pandoc identifiers), so links written
for one work on the other. Nothing is executed: the pages show the outputs stored in the notebooks.
"""
from __future__ import annotations

import argparse
import ast
import copy
import html
import importlib
import queue
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
SITE_TITLE = 'vlmlab'
DROPPED_MIMES = ('application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json')


def html_name(nb_path: str | Path) -> str:
    "The page a notebook becomes on the nbdev site: numeric prefix dropped, lower case (`04_collators.ipynb` -> `collators.html`)."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(nb_path).name.lower()).rsplit('.', 1)[0] + '.html'


def pandoc_id(text: str) -> str:
    "The identifier pandoc (so Quarto) gives a heading with this text: lower case, punctuation dropped, words joined by '-'."
    t = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)           # links and images -> their text
    t = re.sub(r'\{[#.][^}]*\}\s*$', '', t).replace('`', '').replace('*', '')
    t = ''.join(c for c in t.lower() if c.isalnum() or c.isspace() or c in '_-.')
    t = '-'.join(t.split())
    t = re.sub(r'^[^a-z\u00c0-\uffff]+', '', t)                     # up to the first letter
    return t or 'section'


def unique_id(base: str, taken: set[str]) -> str:
    "`base`, or `base-1`, `base-2`, ... as pandoc numbers repeated identifiers."
    i, cand = 0, base
    while cand in taken: i += 1; cand = f"{base}-{i}"
    taken.add(cand)
    return cand


_FENCE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.M | re.S)
_ATX = re.compile(r'^(#{1,6})\s+(.+?)\s*#*\s*$', re.M)


def markdown_headings(md: str) -> list[tuple[int, str]]:
    "(level, text) of the ATX headings of a markdown cell, fenced code skipped."
    return [(len(h), t) for h, t in _ATX.findall(_FENCE.sub('', md))]


def notebook_anchors(nb_path: str | Path) -> dict[str, str]:
    "Anchor -> heading text for the section headings (level 2+) of a notebook, as its page will have them."
    import json
    nb, taken, out = json.loads(Path(nb_path).read_text(encoding='utf-8')), set(), {}
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        for level, text in markdown_headings(''.join(c['source'])):
            if level == 1: continue                                        # the title: front matter on the site
            out[unique_id(pandoc_id(text), taken)] = text
    return out


def sidebar_notebooks(nbs: Path = NBS) -> list[Path]:
    "The notebooks in the order of `sidebar.yml`, then any notebook it does not list."
    import yaml
    def flat(items):
        for it in items or []:
            if isinstance(it, str): yield it
            elif isinstance(it, dict):
                if isinstance(it.get('href'), str): yield it['href']
                yield from flat(it.get('contents'))
    sb = nbs / 'sidebar.yml'
    listed = list(flat(yaml.safe_load(sb.read_text())['website']['sidebar']['contents'])) if sb.exists() else []
    found = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    order = [nbs / n for n in listed if (nbs / n).suffix == '.ipynb' and (nbs / n).exists()]
    return order + [p for p in found if p not in order]


def mixed_import_cells(nb_path: str | Path) -> list[str]:
    "Cells that nbdev's docs build would execute although they do more than import (`Found cells containing imports and other code`)."
    import json
    out = []
    for c in json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']:
        if c['cell_type'] != 'code': continue
        lines = ''.join(c['source']).splitlines()
        dirs = ' '.join(l.strip() for l in lines if l.strip().startswith('#|'))
        if re.search(r'#\|\s*(export|exporti|exports|hide|default_exp)\b', dirs) or re.search(r'eval:\s*false', dirs): continue
        try: tree = ast.parse('\n'.join(l for l in lines if not l.lstrip().startswith('%')))
        except SyntaxError: continue
        nodes = list(ast.walk(tree))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
            out.append(c.get('id') or '?')
    return out


# ---- processing: nbdev's processors, with show_doc rendered from the library instead of executed cells

def _processors() -> Any:
    "nbdev's docs processors with `exec_show_docs` (which re-runs notebook cells) replaced by `RenderShowDocs`."
    from nbdev.process import Processor
    from nbdev.processors import FilterDefaults, exec_show_docs
    from nbdev.showdoc import show_doc

    class RenderShowDocs(Processor):
        "Render `show_doc(name)` cells with the notebook's exported module as namespace; run nothing else."
        def begin(self):
            m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', '\n'.join(c.source for c in self.nb.cells if c.cell_type == 'code'), re.M)
            lib = getattr(_processors, 'lib_name', 'vlmlab')
            self.ns = {'show_doc': show_doc}
            if m: self.ns.update(vars(importlib.import_module(f"{lib}.{m.group(1)}")))

        def __call__(self, cell):
            if cell.cell_type != 'code' or not re.match(r'^(#\|.*\n)*show_doc\(', cell.source or ''): return
            expr = '\n'.join(l for l in cell.source.splitlines() if not l.startswith('#|'))
            try: md = eval(expr, dict(self.ns))._repr_markdown_()
            except Exception as e:
                warnings.warn(f"{getattr(self.nb, 'path_', '?')}: cannot render {expr!r} ({type(e).__name__}: {e})")
                cell.source = None; return
            md = re.sub(r'\]\(([^)]*)\)\{[^}]*\}', r'](\1)', md)          # pandoc link attributes
            cell.outputs = [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/markdown': md}}]

    class DocsFilter(FilterDefaults):
        def base_procs(self): return [RenderShowDocs if p is exec_show_docs else p for p in super().base_procs()]
    return DocsFilter()


def process_notebook(path: Path, # a notebook
                     filt=None, # the processors (default: `_processors()`)
                    ) -> Any:
    "Read a notebook and run the docs processors on it; returns the processed notebook (execnb AttrDict)."
    from execnb.nbio import read_nb
    nb = read_nb(path)
    nb.path_ = str(path)
    (filt or _processors())(nb)
    return nb


def _strip_directives(src: str) -> str:
    "Source without its `#|` directive lines."
    return '\n'.join(l for l in src.splitlines() if not re.match(r'^\s*#\|', l)).strip('\n')


def to_nbformat(nb: Any, # a notebook processed by `process_notebook`
               ) -> Any:
    "The processed notebook as nbformat cells ready for nbconvert: directives applied and removed, front matter dropped."
    import nbformat
    cells = []
    for c in nb.cells:
        if c.cell_type == 'raw': continue                                       # front matter
        if c.cell_type == 'markdown':
            cells.append(nbformat.v4.new_markdown_cell(c.source)); continue
        d = dict(getattr(c, 'directives_', {}) or {})
        for l in (c.source or '').splitlines():        # directives added by processors (show_doc cells) are in the source
            m = re.match(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$', l)
            if m: d[m.group(1) + ':'] = [m.group(2)]
        opt = lambda k: (d.get(k + ':') or [''])[0].lower()
        if opt('include') == 'false': continue
        outs = [] if opt('output') == 'false' else [copy.deepcopy(dict(o)) for o in c.get('outputs', [])]
        for o in outs:
            if 'data' in o:
                o['data'] = {k: (''.join(v) if isinstance(v, list) else v) for k, v in o['data'].items() if k not in DROPPED_MIMES}
            if isinstance(o.get('text'), list): o['text'] = ''.join(o['text'])
        outs = [nbformat.from_dict(o) for o in outs if o.get('output_type') != 'display_data' or o.get('data')]
        src = '' if opt('echo') == 'false' else _strip_directives(c.source)
        if not src and not outs: continue
        cell = nbformat.v4.new_code_cell(src, outputs=outs)
        if not src: cell.metadata['tags'] = ['vlmlab-no-input']
        cells.append(cell)
    return nbformat.v4.new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'Python 3'},
                                                            'language_info': {'name': 'python'}})


# ---- the page

PAGE_CSS = """
:root { --side: 17rem; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --code: #f6f8fa; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.55 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink); background: #fff; }
a { color: var(--accent); }
nav.sidebar { position: fixed; top: 0; bottom: 0; left: 0; width: var(--side); overflow-y: auto; padding: 1.2rem 1rem;
  border-right: 1px solid var(--line); background: #fafbfc; font-size: 0.92rem; }
nav.sidebar .site-title { display: block; font-size: 1.25rem; font-weight: 700; color: var(--ink); text-decoration: none; margin-bottom: .8rem; }
nav.sidebar ul { list-style: none; margin: 0; padding: 0; }
nav.sidebar li { margin: .1rem 0; }
nav.sidebar li a { display: block; padding: .2rem .5rem; border-radius: 4px; text-decoration: none; color: var(--ink); }
nav.sidebar li.active > a { background: #e3ecf7; font-weight: 600; }
nav.sidebar ul.toc { margin: .2rem 0 .5rem .8rem; border-left: 2px solid var(--line); }
nav.sidebar ul.toc a { color: var(--muted); font-size: .85rem; padding: .1rem .5rem; }
nav.sidebar ul.toc li.h3 a { padding-left: 1.2rem; }
main { margin-left: var(--side); padding: 1.5rem 2.5rem 4rem; max-width: calc(var(--side) + 62rem); }
header.title-block h1 { margin: 0 0 .3rem; font-size: 2.2rem; }
header.title-block .description { color: var(--muted); font-size: 1.1rem; margin: 0 0 1.5rem; }
h2 { border-bottom: 1px solid var(--line); padding-bottom: .25rem; margin-top: 2.2rem; }
.anchor-link { visibility: hidden; margin-left: .3rem; text-decoration: none; }
h2:hover .anchor-link, h3:hover .anchor-link, h4:hover .anchor-link { visibility: visible; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .86rem; }
:not(pre) > code { background: var(--code); padding: .1rem .3rem; border-radius: 4px; }
.input_area pre, .highlight pre { background: var(--code); padding: .7rem .9rem; border-radius: 6px; overflow-x: auto; margin: .6rem 0; }
.output_area pre { margin: .3rem 0 .8rem; padding: .5rem .9rem; border-left: 3px solid var(--line); overflow-x: auto; white-space: pre; }
.output_subarea img, .rendered_html img { max-width: 100%; height: auto; }
.output_stderr pre { background: #fff5f5; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: var(--code); }
blockquote { color: var(--muted); border-left: 4px solid var(--line); margin: .8rem 0; padding: .1rem 1rem; }
.prompt, .input_prompt, .output_prompt { display: none; }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; border-top: 1px solid var(--line); padding-top: .8rem; }
@media (max-width: 800px) { nav.sidebar { position: static; width: auto; border-right: 0; } main { margin-left: 0; padding: 1rem; } }
"""


def _exporter() -> Any:
    "nbconvert's HTML exporter, body only (basic template), no prompts, input of `echo: false` cells removed."
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.HTMLExporter.exclude_input_prompt = c.HTMLExporter.exclude_output_prompt = True
    c.HTMLExporter.default_preprocessors = ['nbconvert.preprocessors.TagRemovePreprocessor',
                                            'nbconvert.preprocessors.CoalesceStreamsPreprocessor']
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'vlmlab-no-input'}
    return HTMLExporter(template_name='basic', config=c)


_HEADING = re.compile(r'<h([1-6])([^>]*)>(.*?)</h\1>', re.S)
_HREF = re.compile(r'href="([^"]*)"')


def _text(fragment: str) -> str:
    "The text of an HTML fragment."
    return html.unescape(re.sub(r'<[^>]+>', '', fragment)).strip()


def _fix_body(body: str, site_url: str, names: dict[str, str]) -> tuple[str, list[tuple[int, str, str]]]:
    "Pandoc heading ids, relative site links, notebook links -> page links; returns (body, [(level, id, text)])."
    taken, toc = set(), []
    md_cells = [m.start() for m in re.finditer(r'class="text_cell_render', body)]
    outputs = [m.start() for m in re.finditer(r'class="output_area', body)]
    def in_markdown_cell(pos):
        last = lambda xs: max((x for x in xs if x < pos), default=-1)
        return last(md_cells) > last(outputs)
    def heading(m):
        level, attrs, inner = m.group(1), m.group(2), re.sub(r'<a class="anchor-link"[^>]*>.*?</a>', '', m.group(3))
        text = _text(inner)
        hid = unique_id(pandoc_id(text), taken)
        attrs = re.sub(r'\s*id="[^"]*"', '', attrs)
        if level in '23' and in_markdown_cell(m.start()): toc.append((int(level), hid, text))
        return f'<h{level} id="{hid}"{attrs}>{inner}<a class="anchor-link" href="#{hid}">¶</a></h{level}>'
    def href(m):
        h = html.unescape(m.group(1))
        if site_url and h.startswith(site_url): h = h[len(site_url):].lstrip('/') or 'index.html'
        nb = re.match(r'^([^/#:?]+\.ipynb)(#.*)?$', h)
        if nb: h = names.get(nb.group(1), html_name(nb.group(1))) + (nb.group(2) or '')
        return f'href="{html.escape(h)}"'
    body = _HEADING.sub(heading, body)
    return _HREF.sub(href, body), toc


def render_body(nb_data: Any, exporter: Any, site_url: str, names: dict[str, str]) -> tuple[str, list[tuple[int, str, str]]]:
    "nbconvert's HTML for a notebook prepared by `to_nbformat`, with site ids and links; returns (body, toc)."
    return _fix_body(exporter.from_notebook_node(nb_data)[0], site_url, names)


def _render_worker(jobs: Any, results: Any, site_url: str, names: dict[str, str]) -> None:
    "Render bodies from `jobs` into `results` until a None arrives (runs in its own process)."
    import traceback
    try:
        exporter = _exporter()
        while (job := jobs.get()) is not None:
            name, data = job
            results.put((name, *render_body(data, exporter, site_url, names)))
    except Exception: results.put(('error', traceback.format_exc(), None))
    results.put(None)


def render_page(nb_path: Path, # the notebook
                fm: dict, # its front matter (title, description)
                body: str, # its cells as HTML (`render_body`)
                toc: list, # its sections: (level, id, text)
                pages: list[tuple[str, str]], # (page, title) of every page, in sidebar order
                css: str, # the style sheet
               ) -> str:
    "One HTML page: sidebar (with this page's sections), title block, the notebook's cells."
    this = html_name(nb_path)
    title = fm.get('title') or Path(nb_path).stem
    items = []
    for href, label in pages:
        sub = ''
        if href == this and toc:
            sub = '<ul class="toc">' + ''.join(f'<li class="h{lv}"><a href="#{i}">{html.escape(t)}</a></li>' for lv, i, t in toc) + '</ul>'
        items.append(f'<li class="{"active" if href == this else ""}"><a href="{href}">{html.escape(label)}</a>{sub}</li>')
    desc = fm.get('description')
    desc_html = f'<p class="description">{_inline_markdown(desc)}</p>' if desc else ''
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)} – {SITE_TITLE}</title><style>{css}</style></head>\n<body>\n'
            f'<nav class="sidebar"><a class="site-title" href="index.html">{SITE_TITLE}</a><ul>{"".join(items)}</ul></nav>\n'
            f'<main><header class="title-block"><h1 class="title">{html.escape(title)}</h1>{desc_html}</header>\n{body}\n'
            f'<footer>Generated from <code>nbs/{Path(nb_path).name}</code> by <code>tools/docs.py</code> (the Quarto site: <code>nbdev_docs</code>).</footer>'
            f'</main>\n</body></html>\n')


def _inline_markdown(text: str) -> str:
    "A one-paragraph markdown string as inline HTML."
    from nbconvert.filters.markdown import markdown2html_mistune
    return re.sub(r'^\s*<p>(.*)</p>\s*$', r'\1', markdown2html_mistune(text), flags=re.S)


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style='default').get_style_defs('.highlight')


def build(out: str | Path = ROOT / '_docs', # folder to write the site into (emptied first)
          nbs: str | Path = NBS, # the notebooks folder (with sidebar.yml and styles.css)
          quiet: bool = False, # print nothing
          jobs: int = 2, # 2: render with nbconvert in a second process while this one processes; 1: all here
         ) -> list[Path]:
    "Process and render every notebook of the sidebar into `out`; return the pages written."
    import multiprocessing as mp
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    t0, out, nbs = time.time(), Path(out), Path(nbs)
    cfg = get_config(path=ROOT)
    _processors.lib_name = cfg.lib_name
    site_url = (cfg.doc_host.rstrip('/') + '/' + cfg.doc_baseurl.strip('/')).rstrip('/') + '/'
    paths = sidebar_notebooks(nbs)
    names = {p.name: html_name(p) for p in paths}
    if jobs > 1:   # fork before torch is imported here; the child only needs nbconvert
        ctx = mp.get_context('fork')
        job_q, res_q = ctx.Queue(), ctx.Queue()
        worker = ctx.Process(target=_render_worker, args=(job_q, res_q, site_url, names), daemon=True)
        worker.start()
    else: exporter = _exporter()
    filt, fms, rendered = _processors(), {}, {}
    with warnings.catch_warnings(record=True) as caught, working_directory(nbs):
        warnings.simplefilter('always')
        for p in paths:
            nb = process_notebook(p, filt)
            fms[p.name] = getattr(nb, 'frontmatter_', {}) or {}
            if jobs > 1: job_q.put((p.name, to_nbformat(nb)))
            else: rendered[p.name] = render_body(to_nbformat(nb), exporter, site_url, names)
    if jobs > 1:
        job_q.put(None)
        while True:
            try: res = res_q.get(timeout=5)
            except queue.Empty:
                if worker.is_alive(): continue
                raise RuntimeError(f"the render process ended (exit code {worker.exitcode}) before all pages were rendered") from None
            if res is None: break
            if res[0] == 'error': raise RuntimeError(f"rendering failed:\n{res[1]}")
            rendered[res[0]] = res[1:]
        worker.join(60)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    css = _pygments_css() + PAGE_CSS + ((nbs / 'styles.css').read_text() if (nbs / 'styles.css').exists() else '')
    pages = [(html_name(p), fms[p.name].get('title') or p.stem) for p in paths]
    written = []
    for p in paths:
        dest = out / html_name(p)
        dest.write_text(render_page(p, fms[p.name], *rendered[p.name], pages, css), encoding='utf-8')
        written.append(dest)
    if not quiet:
        for w in caught:
            if 'cannot render' in str(w.message): print(f"warning: {w.message}", file=sys.stderr)
        for p in paths:
            mixed = mixed_import_cells(p)
            if mixed: print(f"note: {p.name}: cells {mixed} mix imports with other code; `nbdev_docs` would execute them", file=sys.stderr)
        print(f"docs: {len(written)} pages in {out} ({time.time() - t0:.1f} s)")
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT / '_docs'), help='output folder (emptied first)')
    ap.add_argument('--quiet', action='store_true', help='print nothing')
    ap.add_argument('--jobs', type=int, default=2, help='2: render in a second process while notebooks are processed; 1: one process')
    a = ap.parse_args()
    build(a.out, quiet=a.quiet, jobs=a.jobs)


if __name__ == '__main__':
    main()
