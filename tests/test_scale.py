"""Conversion at LLaVA-Pretrain scale: lazy records, sharded conversion merged as one run, Hugging Face datasets as a source."""
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmlab.data import convert, convert_samples, iter_json_list, make_shapes, read_jsonl, validate
from vlmlab.scale import (LazyRecords, RecordError, ShardError, check_shards, convert_shard, is_hf_source, iter_samples,
                          merge_shards, open_hf, parse_shard, read_hf, shard_dir, shard_of)
from vlmlab.vision import ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)


def png(size=(96, 64), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO(); Image.new('RGB', size, color).save(buf, 'PNG'); return buf.getvalue()


def jsonl_file(path: Path) -> Path:
    "A JSONL file with a BOM, blank and whitespace-only lines, non-ASCII text and a bad line."
    rows = [json.dumps({'id': 'a', 'text': 'über'}, ensure_ascii=False), '', '   ', json.dumps({'id': 'b', 'n': [1, 2]}),
            '\u2003', json.dumps({'id': 'c', 'text': '雪'}, ensure_ascii=False)]
    path.write_bytes(b'\xef\xbb\xbf' + '\n'.join(rows).encode() + b'\n')
    return path


def test_lazy_records_equal_read_jsonl(tmp_path):
    f = jsonl_file(tmp_path / 'train.jsonl')
    want = list(read_jsonl(f))
    lazy = LazyRecords(f)
    assert len(lazy) == len(want) == 3
    assert list(lazy) == [r for _, r, _ in want] and [lazy.line_of(i) for i in range(3)] == [n for n, _, _ in want] == [1, 4, 6]
    assert lazy[-1] == want[-1][1] and lazy[1:] == [want[1][1], want[2][1]]
    assert lazy.nbytes == 3 * 16
    picked = lazy.select([2, 0])
    assert list(picked) == [want[2][1], want[0][1]] and [picked.line_of(i) for i in (0, 1)] == [6, 1] and len(lazy) == 3
    with pytest.raises(IndexError, match='holds 3 records'): lazy[3]
    bad = tmp_path / 'bad.jsonl'; bad.write_bytes(b'{"id": "a"}\n{"id": \n\xff\xfe\n')
    b = LazyRecords(bad)
    assert b[0] == {'id': 'a'}
    with pytest.raises(RecordError, match=r'bad.jsonl:2: malformed JSON'): b[1]
    with pytest.raises(RecordError, match=r'bad.jsonl:3: not UTF-8 text'): b[2]


def test_lazy_records_refuse_a_file_changed_after_indexing(tmp_path):
    f = jsonl_file(tmp_path / 'train.jsonl'); lazy = LazyRecords(f)
    f.write_text('{"id": "other"}\n')
    with pytest.raises(RecordError, match='changed since its records were indexed'): lazy[0]


def test_lazy_records_in_two_dataloader_workers(tmp_path):
    f = tmp_path / 'train.jsonl'
    f.write_text(''.join(json.dumps({'id': f's{i}', 'k': i}) + '\n' for i in range(50)))
    lazy = LazyRecords(f)
    assert lazy[7]['k'] == 7   # the parent holds an open handle before the workers fork
    dl = torch.utils.data.DataLoader(lazy, batch_size=None, num_workers=2, collate_fn=lambda r: r)
    assert [r['k'] for r in dl] == list(range(50))
    again = pickle.loads(pickle.dumps(lazy))   # spawned workers get a pickled copy: no handle in it
    assert again._fh is None and again[49] == {'id': 's49', 'k': 49}
    assert lazy[8]['k'] == 8   # the parent's own handle still reads at the right place


def test_shard_assignment_is_stable_and_disjoint():
    ids = [f'sample-{i}' for i in range(2000)]
    counts = [sum(shard_of(s, 4) == i for s in ids) for i in range(4)]
    assert sum(counts) == 2000 and min(counts) > 400, counts
    code = "from vlmlab.scale import shard_of; print([shard_of(f'sample-{i}', 7) for i in range(40)])"
    runs = {subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                           env={'PYTHONHASHSEED': seed, 'PATH': ''}).stdout for seed in ('1', '2')}
    assert runs == {str([shard_of(f'sample-{i}', 7) for i in range(40)]) + '\n'}   # Python's hash() would differ
    assert shard_of('sample-0', 8) == 2 and shard_of('雪', 8) == 1   # sha256 of the id: the same on every machine
    assert parse_shard('3/8') == (3, 8)
    for bad in ('8/8', '-1/4', '3', 'a/b'):
        with pytest.raises(ValueError, match='shard'): parse_shard(bad)


def mixed_inputs(tmp_path: Path) -> list[Path]:
    "Raw shapes (old-format rejects, EXIF-rotated photos), broken raw files, and a LLaVA file with text-only, duplicate and bad samples."
    raw = tmp_path / 'raw'
    make_shapes(raw, n=16, seed=3, old_format=0.2, exif_rotated=0.3)
    (raw / 'broken.json').write_text('{"image": "shapes_00000.png", "objects": [')
    (raw / 'outside.json').write_text(json.dumps({'image': (raw / 'shapes_00001.json').name.replace('.json', '.png')
                                                  if (raw / 'shapes_00001.png').exists() else 'shapes_00001.jpg',
                                                  'objects': [{'bbox': [0, 0, 5000, 10], 'desc': 'too wide'}]}))
    img = 'raw/' + next(raw.glob('*.png')).name   # relative to the LLaVA file's folder
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    llava = [{'id': f'l{i}', 'image': img, 'conversations': turn('<image>\nWhat is this?', f'Shapes {i}.')} for i in range(6)]
    llava += [{'id': 'l2', 'image': img, 'conversations': turn('<image>\nAgain?', 'A duplicate id.')},
              {'id': 'txt', 'conversations': turn('Say hi.', 'Hi.')},
              {'id': 'noimg', 'image': img, 'conversations': turn('No placeholder.', 'Rejected.')}]
    (tmp_path / 'llava.json').write_text(json.dumps(llava))
    return [raw, tmp_path / 'llava.json']


def split_files_of(out: Path) -> dict:
    "What a conversion leaves: records, rejects, summary (less its run), manifest counts and images, image bytes."
    summary = json.loads((out / 'train.summary.json').read_text())
    manifest = json.loads((out / 'train.manifest.json').read_text())
    return {'records': (out / 'train.jsonl').read_bytes(), 'rejects': (out / 'train.rejects.jsonl').read_bytes(),
            'summary': {k: v for k, v in summary.items() if k not in ('run_id', 'out_dir')},
            'counts': manifest['counts'], 'images': manifest['images'],
            'image_bytes': {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / 'images').rglob('*')) if p.is_file()}}


@pytest.fixture(scope='module')
def unsharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('mixed'); inputs = mixed_inputs(tmp)
    s = convert(inputs, tmp / 'one', SPEC, progress=False)
    return inputs, split_files_of(tmp / 'one'), s


def test_shards_merge_to_one_unsharded_run(unsharded, tmp_path):
    inputs, one, s = unsharded
    assert s.rejected >= 6 and s.written >= 12 and s.notes and s.reasons.get('duplicate id') == 1, s
    out = tmp_path / 'sharded'
    parts = [convert_shard(inputs, out, f'{i}/3', spec=SPEC, progress=False) for i in range(3)]
    assert sum(p.inputs for p in parts) == s.inputs and all(p.balanced for p in parts) and min(p.inputs for p in parts) > 0
    merged = merge_shards(out)
    assert (merged.inputs, merged.written, merged.rejected) == (s.inputs, s.written, s.rejected)
    assert split_files_of(out) == one   # byte for byte: records in input order, rejects, notes, images
    assert not (out / 'shards').exists() and validate(out, SPEC, progress=False).ok


def test_streaming_conversion_equals_convert(unsharded, tmp_path):
    inputs, one, s = unsharded
    streamed = convert_samples(iter_samples(inputs), tmp_path / 'stream', SPEC, chunk=5, progress=False)
    assert streamed.inputs == s.inputs and split_files_of(tmp_path / 'stream') == one
    with pytest.raises(ValueError, match='no input samples'): convert_samples(iter([]), tmp_path / 'none', SPEC, progress=False)


def test_merge_refuses_a_missing_or_doubled_shard(unsharded, tmp_path):
    inputs, _, _ = unsharded
    out = tmp_path / 'ds'
    for i in range(3): convert_shard(inputs, out, (i, 3), spec=SPEC, progress=False)
    keep = tmp_path / 'keep'; shutil.copytree(out / 'shards', keep)
    owner = check_shards(out)[1]   # the shard of every input position
    assert len(owner) == unsharded[2].inputs and sorted(set(owner.tolist())) == [0, 1, 2]
    shutil.rmtree(shard_dir(out, 'train', (1, 3)))
    with pytest.raises(ShardError, match=r'shard\(s\) 1/3 of split .train. missing \(no folder train-00001-of-00003\)'): merge_shards(out)
    shutil.copytree(shard_dir(out, 'train', (0, 3)), shard_dir(out, 'train', (1, 3)))   # shard 0 copied in as shard 1
    with pytest.raises(ShardError, match=r'shard 1/3 \(train-00001-of-00003\): its shard file says shard 0/3'): merge_shards(out)
    info_path = shard_dir(out, 'train', (1, 3)) / 'train.shard.json'
    info = json.loads(info_path.read_text()); info['shard'] = 1; info_path.write_text(json.dumps(info))   # and relabelled
    with pytest.raises(ShardError, match=r'input \d+ is in shard 1/3 and in shard 0/3: a shard is doubled'): merge_shards(out)
    shutil.rmtree(out / 'shards'); shutil.copytree(keep, out / 'shards')
    convert_shard(inputs, out, '0/2', spec=SPEC, progress=False)
    with pytest.raises(ShardError, match=r'different shard counts \[2, 3\]'): merge_shards(out)
    shutil.rmtree(shard_dir(out, 'train', (0, 2)))
    convert_shard(inputs[:1], out, '2/3', spec=SPEC, progress=False)   # one node given other inputs
    with pytest.raises(ShardError, match=r'shard 2/3 read \d+ inputs .* every shard must get the same inputs'): merge_shards(out)
    assert not (out / 'train.jsonl').exists()   # nothing merged by any refused attempt


@pytest.fixture(scope='module')
def hf_sources(tmp_path_factory):
    "A saved dataset (image bytes, LLaVA conversations), and parquet files with image paths + captions and with image bytes."
    datasets = pytest.importorskip('datasets')
    tmp = tmp_path_factory.mktemp('hf')
    turn = lambda a: [{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': a}]
    feats = datasets.Features({'id': datasets.Value('string'), 'image': datasets.Image(),
                               'conversations': datasets.List({'from': datasets.Value('string'), 'value': datasets.Value('string')})})
    rows = {'id': ['r', 'g', 'b', 'bad'],
            'image': [{'bytes': png(color=c), 'path': None} for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))] + [{'bytes': b'not an image', 'path': None}],
            'conversations': [turn('Red.'), turn('Green.'), turn('Blue.'), turn('Unknown.')]}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp / 'saved'))
    (tmp / 'pics').mkdir()
    for k in range(3): (tmp / 'pics' / f'{k}.png').write_bytes(png(size=(80 + 8 * k, 64)))
    datasets.Dataset.from_dict({'image_path': [f'pics/{k}.png' for k in range(3)] + ['pics/missing.png'],
                                'caption': ['one', 'two', 'three', 'gone']}).to_parquet(str(tmp / 'captions.parquet'))
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp / 'bytes.parquet'))
    return tmp


def test_hf_sources_are_recognised_and_streamed(hf_sources, unsharded):
    import datasets
    assert is_hf_source(hf_sources / 'saved') and is_hf_source(hf_sources / 'captions.parquet')
    assert not any(is_hf_source(p) for p in unsharded[0])   # a raw JSON folder and a LLaVA JSON are not
    for src in ('saved', 'bytes.parquet'):
        ds = open_hf(hf_sources / src)
        assert isinstance(ds, datasets.IterableDataset) and ds.features['image'].decode is False


def test_hf_saved_dataset_with_image_bytes(hf_sources, tmp_path):
    stage = tmp_path / 'stage'; stage.mkdir()
    s = convert_samples(iter_samples(hf_sources / 'saved', stage_dir=stage), tmp_path / 'ds', SPEC, progress=False, staged=stage)
    assert (s.inputs, s.written, s.rejected) == (4, 3, 1) and 'cannot read image header' in (tmp_path / 'ds' / 'train.rejects.jsonl').read_text()
    recs = list(LazyRecords(tmp_path / 'ds' / 'train.jsonl'))
    assert [r['id'] for r in recs] == ['r', 'g', 'b'] and recs[0]['orig_size'] == [96, 64]
    assert recs[1]['conversations'][-1] == {'role': 'assistant', 'content': 'Green.'}
    assert Image.open(tmp_path / 'ds' / recs[1]['image']).getpixel((5, 5)) == (0, 200, 0)
    assert not list(stage.iterdir())   # every staged image deleted once converted
    assert validate(tmp_path / 'ds', SPEC, progress=False).ok


def test_hf_parquet_with_paths_and_captions(hf_sources, tmp_path):
    with pytest.raises(Exception, match=r"captions in column 'caption' need the question they answer"):
        next(read_hf(hf_sources / 'captions.parquet'))
    samples = list(read_hf(hf_sources / 'captions.parquet', prompt='Describe the image.'))
    assert [s.id for s in samples] == ['captions-0', 'captions-1', 'captions-2', 'captions-3']
    assert samples[1].image_path == hf_sources / 'pics' / '1.png'
    assert samples[1].conversations == [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Describe the image.'}]},
                                        {'role': 'assistant', 'content': 'two'}]
    s = convert_samples(iter(samples), tmp_path / 'ds', SPEC, progress=False)
    assert (s.written, s.rejected) == (3, 1) and 'missing.png' in (tmp_path / 'ds' / 'train.rejects.jsonl').read_text()


def test_hf_parquet_with_image_bytes_sharded(hf_sources, tmp_path):
    one = convert_samples(iter_samples(hf_sources / 'bytes.parquet', stage_dir=tmp_path), tmp_path / 'one', SPEC, progress=False)
    for i in range(2): convert_shard(hf_sources / 'bytes.parquet', tmp_path / 'two', (i, 2), spec=SPEC, progress=False)
    two = merge_shards(tmp_path / 'two')
    assert (two.written, two.rejected) == (one.written, one.rejected) == (3, 1)
    assert (tmp_path / 'two' / 'train.jsonl').read_bytes() == (tmp_path / 'one' / 'train.jsonl').read_bytes()


@pytest.mark.parametrize('chunk', [1, 2, 3, 7, 64, 1 << 20])
def test_iter_json_list_equals_json_loads(tmp_path, chunk):
    f = tmp_path / 'list.json'
    cases = [[], [1], [12345, 6.5e10, -3, 'a]b,c', {'x': [1, {'y': ']'}]}, None, True, 'x\\"y'],
             [{'id': i, 'conversations': [{'from': 'human', 'value': '<image>\n雪 "q" ' * (i % 5)}]} for i in range(100)]]
    for items in cases:
        for indent in (None, 2):
            f.write_text(json.dumps(items, indent=indent, ensure_ascii=False))
            assert list(iter_json_list(f, chunk)) == items
    for bad, msg in (('{"a": 1}', 'expected a JSON list'), ('[1, 2', 'not closed'), ('[1 2]', "expected ','"), ('[1] x', 'text after'),
                     ('', 'expected a JSON list'), ('[1,\n\n {"a": nope}]', 'malformed JSON at line 3')):
        f.write_text(bad)
        with pytest.raises(ValueError, match=msg): list(iter_json_list(f, chunk))


def test_parquet_sources_that_cannot_be_read_are_named(tmp_path):
    import datasets
    from vlmlab.data import Reject
    folder = tmp_path / 'pq'; folder.mkdir()
    datasets.Dataset.from_dict({'id': ['a'], 'text': ['one']}).to_parquet(str(folder / 'a.parquet'))
    datasets.Dataset.from_dict({'id': ['b'], 'caption': ['two']}).to_parquet(str(folder / 'b.parquet'))   # other columns
    with pytest.raises(Reject, match=r'different columns or types than .*a\.parquet'): open_hf(folder)
    (folder / 'b.parquet').write_bytes(b'not parquet at all')
    with pytest.raises(Reject, match=r'b\.parquet: not a parquet file'): open_hf(folder)


def test_parquet_rows_come_whole_and_in_order_across_row_groups(tmp_path):
    import datasets
    rows = {'id': [f'r{i}' for i in range(2500)], 'text': [f'caption {i}' for i in range(2500)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / 'a.parquet'), batch_size=1000)
    got = list(open_hf(tmp_path / 'a.parquet'))
    assert [r['id'] for r in got] == rows['id'] and [r['text'] for r in got] == rows['text']
