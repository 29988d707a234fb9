"""Memory that does not grow with the records: ids as digests, leaks found from digests, the spool committed without being
read whole, manifests checked streamed; and peak Python memory of convert / validate per record (tracemalloc)."""
import json
import random
import tracemalloc
from functools import partial
from pathlib import Path

import pytest

from vlmlab.commit import ManifestError, check_manifest, commit_split, split_files
import vlmlab.data as data
from vlmlab.data import convert, validate
from vlmlab.leakage import find_leaks, record_text, stored_images
from vlmlab.scale import DigestSet, LazyRecords


def dict_leaks(splits: dict) -> list[str]:
    "The leak check as a dict of every key (what find_leaks did before it held digests): the reference."
    leaks, first = [], {}
    for split, recs in splits.items():
        for r in recs:
            for kind, key in [('image', e.get('image_sha256')) for e in stored_images(r)] + [('text', record_text(r))]:
                if not key: continue
                prev = first.setdefault((kind, key), (split, r.get('id')))
                if prev[0] != split:
                    leaks.append(f"{split}:{r.get('id')} has the same {'image bytes' if kind == 'image' else 'conversation text'} "
                                 f"as {prev[0]}:{prev[1]}")
    return leaks


def random_splits(rng: random.Random) -> dict:
    "1-4 splits of 0-30 records: shared and repeated texts (up to case and punctuation), one or several images, missing hashes."
    splits = {}
    for s in range(rng.randint(1, 4)):
        recs = []
        for i in range(rng.randint(0, 30)):
            r = {'id': f'{s}-{i}', 'conversations': [{'role': 'user', 'content': rng.choice(['a', 'A!', 'b', 'c d', '', '雪'])}]}
            k = rng.randint(0, 3)
            if k == 1: r.update(image='x.png', image_sha256=rng.choice(['h1', 'h2', 'h3', None, '']))
            elif k >= 2: r['images'] = [{'image': f'y{j}', 'image_sha256': rng.choice(['h1', 'h2', 'h4'])} for j in range(k - 1)]
            recs.append(r)
        splits[f'split{s}'] = recs
    return splits


def test_find_leaks_equals_the_dict_of_every_key():
    rng, found = random.Random(0), 0
    for _ in range(400):
        splits = random_splits(rng)
        want = dict_leaks(splits)
        assert find_leaks(splits) == want
        found += len(want)
    assert found > 1000   # the sets leak often: the comparison is not of empty lists


def test_find_leaks_reads_lazy_records(tmp_path):
    splits = random_splits(random.Random(5)) | {'extra': [{'id': 'e', 'conversations': [{'role': 'user', 'content': 'a'}]}]}
    lazy = {}
    for name, recs in splits.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
        lazy[name] = LazyRecords(tmp_path / f'{name}.jsonl')
    assert find_leaks(lazy) == dict_leaks(splits) and find_leaks(lazy)


def test_digest_set_behaves_as_a_set():
    rng = random.Random(1)
    words = [''.join(rng.choice('ab雪\U0001f600\ud800') for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    held, ref = DigestSet(buffer=64), set()   # a small buffer: many merges into the sorted arrays
    for w in words:
        assert (w in held) == (w in ref)
        held.add(w); ref.add(w)
        assert len(held) == len(ref)
    assert all(w in held for w in ref) and not any(w + 'z' in held for w in ref)
    merged = len(ref) - len(held._recent)
    assert 16 * merged <= held.nbytes <= max(24 * merged, 16 * 4 * 64)   # 16 bytes an id, and room to grow
    with pytest.raises(TypeError, match='DigestSet holds strings'): held.add(3)


def test_commit_moves_a_complete_file_and_check_manifest_streams(tmp_path):
    spool = tmp_path / '.train.jsonl.spool.tmp-1'
    spool.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n')
    files = dict(zip(split_files('train'), (spool, b'', b'{}\n')))
    m = commit_split(tmp_path, 'train', files, {}, {'inputs': 2, 'written': 2, 'rejected': 0}, 'run')
    assert not spool.exists() and (tmp_path / 'train.jsonl').read_bytes() == b'{"id": "a"}\n\n{"id": "b"}\n'
    check_manifest(tmp_path, 'train')
    m['counts']['written'] = 3   # a manifest whose count disagrees with the (unchanged) file
    (tmp_path / 'train.manifest.json').write_text(json.dumps(m))
    with pytest.raises(ManifestError, match='holds 2 lines, the manifest counts 3'): check_manifest(tmp_path, 'train')
    outside = tmp_path / 'elsewhere'; outside.mkdir(); (outside / 'x').write_bytes(b'')
    with pytest.raises(ValueError, match='moves only complete files inside'):
        commit_split(tmp_path, 'train', dict(zip(split_files('train'), (outside / 'x', b'', b''))), {}, {}, 'run')


def llava_file(path: Path, n: int) -> Path:
    rows = [{'id': f's{i:07d}', 'conversations': [{'from': 'human', 'value': f'Tell me about sample {i}.'},
                                                  {'from': 'gpt', 'value': f'Sample {i} is a synthetic text-only record.'}]}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def traced_peak(fn) -> int:
    "Peak bytes of Python (and numpy) allocations while `fn` runs."
    tracemalloc.start(1)
    try: fn(); return tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()


@pytest.mark.slow
def test_convert_and_validate_peak_memory_does_not_grow_per_record(tmp_path, monkeypatch):
    """6x the records: the peak of convert and of validate grows by far less than a Python set of the ids (~90 bytes an id) or
    the JSONL bytes held whole (~250 bytes a record here) would add; what is left is the 16-byte id digests and one-off
    growth of interpreter tables."""
    # the LLaVA list is read 1 MiB at a time, more than these small files hold: a smaller buffer keeps that constant here
    monkeypatch.setattr(data, 'iter_json_list', partial(data.iter_json_list, chunk_chars=1 << 14))
    small, large = 1500, 9000
    peaks = {}
    for n in (small, large):
        src, out = llava_file(tmp_path / f'in{n}.json', n), tmp_path / f'out{n}'
        peaks['convert', n] = traced_peak(lambda: convert(str(src), out, progress=False))
        peaks['validate', n] = traced_peak(lambda: validate(out, progress=False))
    for kind in ('convert', 'validate'):
        per_record = (peaks[kind, large] - peaks[kind, small]) / (large - small)
        assert per_record < 64, f"{kind}: peak grows {per_record:.0f} bytes a record ({peaks[kind, small]:,} -> {peaks[kind, large]:,})"
