"""Execute a notebook with nbclient, skipping cells that carry any of the given flags (their stored outputs are kept).

    python tools/run_notebook.py NOTEBOOK [FLAGS_TO_SKIP e.g. slow,gpu] [DEST (default: in place)]
"""
import os
import sys

import nbformat
from nbclient import NotebookClient


def flags(cell) -> set[str]:
    "The `#| slow` / `#| gpu` flags of a code cell."
    if cell.cell_type != 'code': return set()
    return {l.split('|', 1)[1].strip() for l in cell.source.splitlines() if l.startswith('#|') and l[2:].strip() in ('slow', 'gpu')}


def main(path: str, skip: set[str], dest: str | None = None) -> None:
    nb = nbformat.read(path, as_version=4)
    keep = {}
    for i, c in enumerate(nb.cells):
        if flags(c) & skip: keep[i] = c; nb.cells[i] = nbformat.v4.new_markdown_cell('skipped')
    NotebookClient(nb, timeout=1800, kernel_name='python3',
                   resources={'metadata': {'path': os.path.dirname(os.path.abspath(path))}}).execute()
    for i, c in keep.items(): nb.cells[i] = c
    nbformat.write(nb, dest or path)
    print('executed', path, '->', dest or path, 'skipped', sorted(keep))


if __name__ == '__main__':
    a = sys.argv[1:]
    main(a[0], set(a[1].split(',')) if len(a) > 1 and a[1] else set(), a[2] if len(a) > 2 else None)
