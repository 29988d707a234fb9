"""The bug index (nbs/bug_index.ipynb) links to sections that exist and quotes outputs the notebooks really stored."""
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NBS = REPO / 'nbs'
BUG_INDEX = NBS / 'bug_index.ipynb'
sys.path.insert(0, str(REPO / 'tools'))
from docs import html_name, notebook_anchors, sidebar_notebooks  # noqa: E402

LINK = re.compile(r'\]\(([^)\s]+)\)')
QUOTE = re.compile(r'`([^`]+)`')


def markdown_of(nb_path: Path) -> str:
    "All markdown cells of a notebook, joined."
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    return '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')


def split_row(line: str) -> list[str]:
    "The cells of a markdown pipe-table row (pipes inside code spans are not allowed in this page)."
    return [c.strip() for c in line.strip().strip('|').split('|')]


def tables(md: str) -> list[dict]:
    "Every pipe table of a markdown text: its section heading, header and rows (dicts keyed by lower-case header)."
    out, lines, heading, i = [], md.splitlines(), '', 0
    while i < len(lines):
        if lines[i].startswith('#'): heading = lines[i].lstrip('#').strip()
        if lines[i].startswith('|') and i + 1 < len(lines) and re.match(r'^\|[-:| ]+\|$', lines[i + 1].strip()):
            header = [h.lower() for h in split_row(lines[i])]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith('|'):
                cells = split_row(lines[i])
                assert len(cells) == len(header), f"table under {heading!r}: row has {len(cells)} cells, header {len(header)}: {lines[i][:120]}"
                rows.append(dict(zip(header, cells))); i += 1
            out.append({'heading': heading, 'header': header, 'rows': rows})
            continue
        i += 1
    return out


def stored_outputs(nb_path: Path) -> str:
    "The text of every stored output of a notebook (streams, plain text, markdown), joined."
    parts = []
    for c in json.loads(nb_path.read_text(encoding='utf-8'))['cells']:
        for o in c.get('outputs', []):
            if 'text' in o: parts.append(''.join(o['text']))
            for k in ('text/plain', 'text/markdown'):
                if k in o.get('data', {}): parts.append(''.join(o['data'][k]))
    return '\n'.join(parts)


def pages() -> dict[str, Path]:
    "Rendered page name -> notebook, as the docs site names them."
    return {html_name(p): p for p in NBS.glob('*.ipynb')}


def proof_rows() -> list[tuple[str, dict]]:
    "(table heading, row) for every row of the index that links to a proof."
    return [(t['heading'], r) for t in tables(markdown_of(BUG_INDEX)) for r in t['rows'] if LINK.search(r.get('proof', ''))]


def test_index_lists_the_seed_bugs():
    ts = {t['heading']: t for t in tables(markdown_of(BUG_INDEX)) if '#' in t['header']}
    assert len(ts['Worked proofs']['rows']) >= 20, 'the worked-proof table lost rows'
    for t in ts.values():
        seeds = {r['seed'] for r in t['rows']}
        assert seeds <= {'000', '001', '002', '003', '004'}, f"{t['heading']}: unknown seeds {seeds}"
    assert {'000', '001', '002', '004'} <= {r['seed'] for r in ts['Worked proofs']['rows']}
    numbers = [r['#'] for t in ts.values() for r in t['rows']]
    assert len(numbers) == len(set(numbers)), 'row numbers are unique across the tables'


@pytest.mark.parametrize('heading,row', proof_rows(), ids=lambda x: x.get('#', x) if isinstance(x, dict) else None)
def test_proof_links_resolve(heading, row):
    known = pages()
    for target in LINK.findall(row['proof']):
        page, _, anchor = target.partition('#')
        assert page in known, f"row {row['#']}: {page} is not the page of any notebook ({sorted(known)})"
        anchors = notebook_anchors(known[page])
        assert anchor in anchors, f"row {row['#']}: {known[page].name} has no heading with anchor #{anchor}; it has {sorted(anchors)}"


@pytest.mark.parametrize('heading,row', proof_rows(), ids=lambda x: x.get('#', x) if isinstance(x, dict) else None)
def test_quoted_evidence_is_stored_output(heading, row):
    quotes = QUOTE.findall(row.get('evidence (stored output)', ''))
    if heading == 'Worked proofs': assert quotes, f"row {row['#']}: a worked proof quotes its numbers from the notebook's output"
    page = LINK.findall(row['proof'])[0].partition('#')[0]
    outputs = stored_outputs(pages()[page])
    missing = [q for q in quotes if q not in outputs]
    assert not missing, f"row {row['#']}: not in the stored outputs of {pages()[page].name} (re-run changed them? update the index): {missing}"


def test_every_notebook_is_in_the_sidebar():
    listed = set(re.findall(r'[\w.-]+\.ipynb', (NBS / 'sidebar.yml').read_text()))
    missing = sorted(p.name for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')) and p.name not in listed)
    assert not missing, f"nbs/sidebar.yml does not list {missing}: the docs sidebar would put them last"
    assert sidebar_notebooks(NBS)[0].name == 'index.ipynb' and 'bug_index.ipynb' in listed


def test_rows_are_in_order():
    "Every table of the index lists its rows by number, and no number is used twice."
    seen = []
    for t in tables(markdown_of(BUG_INDEX)):
        if '#' not in t['header']: continue
        nums = [int(r['#']) for r in t['rows']]
        assert nums == sorted(nums), f"table under {t['heading']!r} is out of order: {nums}"
        seen += nums
    assert len(seen) == len(set(seen)) and len(seen) > 50, f"row numbers repeat or are missing: {sorted(seen)}"
