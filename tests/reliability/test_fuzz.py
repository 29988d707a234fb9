"""Hypothesis fuzzing of the readers, the box checks, conversion, the record validator, answer spans, packing and
collation: arbitrary input gives a result that holds its invariants or one of the documented errors, never a crash.

Default example counts keep CI within budget; `VLMLAB_FUZZ_EXAMPLES=20000 pytest tests/reliability/test_fuzz.py` runs more.
"""
from __future__ import annotations

import json
import math
import os
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_kit import FUZZ_ENV, case, fuzz_examples, scene
from vlmlab.chat import ChatError, ChatProcessor, ProcessedSample
from vlmlab.collators import CollatorError, PackedBatchSampler, PackedDataCollator, StandardDataCollator, assert_packed_batch
from vlmlab.data import Reject, Sample, check_box, check_record, convert_sample, read_coco, read_jsonl, read_llava, read_raw_json
from vlmlab.tokens import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_PAD,
                           VISION_START)
from vlmlab.vision import ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)


def fuzz(n: int) -> settings:
    "Hypothesis settings: `n` examples drawn the same way every CI run; with $VLMLAB_FUZZ_EXAMPLES, that many fresh random ones."
    return settings(max_examples=fuzz_examples(n), deadline=None, database=None, derandomize=not os.environ.get(FUZZ_ENV),
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                            HealthCheck.data_too_large])


NUMBER = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
JSON = st.recursive(st.none() | NUMBER | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5), max_leaves=20)
LINE = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60).map(lambda b: b.replace(b'\n', b' ').replace(b'\r', b' ')),
    st.sampled_from([10, 900, 5000, 100_000]).map(lambda n: b'[' * n + b']' * n),   # deep nesting
    st.text(max_size=40).map(lambda t: t.replace('\n', ' ').replace('\r', ' ').encode('utf-8', 'surrogatepass')),
)


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    "A folder with one small image for the conversion fuzz."
    d = tmp_path_factory.mktemp('fuzz')
    scene(d / 'img.png', size=(90, 60), box=(10, 10, 40, 40))
    return d


@case('JSONL reader on arbitrary lines (bytes, bad UTF-8, deep nesting)',
      'one (line, value, error) per non-blank line with the right line number; never raises')
@fuzz(200)
@given(lines=st.lists(LINE, max_size=8))
def test_read_jsonl_never_raises(scratch, lines):
    path = scratch / 'fuzz.jsonl'
    path.write_bytes(b'\n'.join(lines) + b'\n')
    rows = list(read_jsonl(path))
    expected = [k + 1 for k, line in enumerate(lines) if line.decode('utf-8', 'replace').strip()]   # blank lines are skipped
    assert [n for n, _, _ in rows] == expected
    for n, value, err in rows:
        assert (err is None) or (value is None and isinstance(err, str) and err)


@case('raw / LLaVA / COCO readers on arbitrary JSON', 'a Sample (maybe carrying its error) or a Reject naming the file; never another exception')
@fuzz(300)
@given(value=JSON, raw_bytes=st.one_of(st.none(), st.binary(max_size=30)))
def test_structured_readers_only_reject(scratch, value, raw_bytes):
    path = scratch / 'input.json'
    path.write_bytes(raw_bytes if raw_bytes is not None else json.dumps(value).encode())
    for reader in (lambda p: [read_raw_json(p, migrate_old=False)], lambda p: [read_raw_json(p, migrate_old=True)],
                   lambda p: list(read_llava(p)), lambda p: list(read_coco(p))):
        try: out = reader(path)
        except Reject as e: assert str(path) in str(e); continue
        for s in out:
            if isinstance(s, Sample): assert s.error is None or str(path) in s.error
            else: assert isinstance(s.get('image'), str) and isinstance(s.get('objects', []), list)


COORD = st.one_of(st.floats(-5, 100, allow_nan=False), st.integers(-5, 100), st.sampled_from([math.nan, math.inf, -math.inf, True, '3', None]))
BOX = st.one_of(st.lists(COORD, min_size=4, max_size=4), st.lists(COORD, max_size=6), JSON)
OBJECT = st.one_of(st.fixed_dictionaries({'bbox': BOX, 'desc': st.one_of(st.text(min_size=0, max_size=10), JSON)}), JSON)


@case('check_box on arbitrary values and image sizes', 'Reject naming the object, or a box with 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h '
      'within 0.5 px of the input')
@fuzz(2000)
@given(bbox=BOX, w=st.integers(1, 200), h=st.integers(1, 200))
def test_check_box_contract(bbox, w, h):
    try: b = check_box(bbox, (w, h), 'sample s object 3')
    except Reject as e:
        assert str(e).startswith('sample s object 3: bbox'); return
    x1, y1, x2, y2 = b
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, b
    assert all(abs(a - float(v)) <= 0.5 for a, v in zip(b, bbox))


@case('conversion of arbitrary objects on a real image', 'Reject naming the sample, or a record that validation accepts '
      '(boxes equal the scaled input)')
@fuzz(150)
@given(objects=st.lists(OBJECT, max_size=4))
def test_convert_sample_round_trip(scratch, objects):
    out = scratch / 'ds_output'
    try: rec = convert_sample(Sample('fz', 'fuzz.json', scratch / 'img.png', objects), SPEC, out)
    except Reject as e:
        assert str(e).startswith("fuzz.json (sample 'fz')"), str(e); return
    check_record(json.loads(json.dumps(rec)), out, SPEC)   # raises if conversion wrote what validation refuses
    sx, sy = rec['size'][0] / 90, rec['size'][1] / 60
    for o, r in zip(objects, rec['objects']):
        clipped = [min(max(float(v), 0), lim) for v, lim in zip(o['bbox'], (90, 60, 90, 60))]
        assert all(abs(a - b * s) <= 1e-3 for a, b, s in zip(r['bbox'], clipped, (sx, sy, sx, sy)))


def _mutate(rec: dict, data) -> dict:
    "Replace, delete or corrupt one field (or one element / key inside it) of a record."
    r = json.loads(json.dumps(rec))
    k = data.draw(st.sampled_from(sorted(r)))
    v = r[k]
    if isinstance(v, dict) and v and data.draw(st.booleans()):
        r[k][data.draw(st.sampled_from(sorted(v)))] = data.draw(JSON)
    elif isinstance(v, list) and v and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(v) - 1))
        if isinstance(v[i], dict) and v[i] and data.draw(st.booleans()): r[k][i][data.draw(st.sampled_from(sorted(v[i])))] = data.draw(JSON)
        else: r[k][i] = data.draw(JSON)
    elif data.draw(st.booleans()): del r[k]
    else: r[k] = data.draw(st.one_of(JSON, st.text(min_size=200, max_size=300)))
    return r


@case('record validator on corrupted records', 'only Reject / FingerprintMismatch (ValueError), never TypeError, KeyError or OSError')
@fuzz(600)
@given(data=st.data())
def test_record_validator_only_documented_errors(tiny_ds, tiny_spec, data):
    root, recs = tiny_ds
    rec = recs[data.draw(st.integers(0, len(recs) - 1))]
    for _ in range(data.draw(st.integers(1, 3))): rec = _mutate(rec, data)
    try: check_record(rec, root, data.draw(st.sampled_from([None, tiny_spec, SPEC])), check_images=data.draw(st.booleans()))
    except ValueError: pass


MARKUP = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)
LABEL = st.text(st.characters(blacklist_categories=('Cs',)), min_size=1, max_size=12).filter(str.strip) | \
        st.sampled_from([t.text for t in SPECIAL_TOKENS]).map(lambda t: f'a {t} b')


@case('answer spans with teacher demonstrations and arbitrary labels', 'one span per example; each decodes to exactly its answer + '
      '<|im_end|>; labels only on spans; chat / vision special-token text in a label is refused naming the sample')
@fuzz(60)
@given(labels=st.lists(st.lists(LABEL, min_size=1, max_size=3), min_size=4, max_size=4), n_teachers=st.integers(0, 2),
       target=st.sampled_from(['grounding', 'caption']), seed=st.integers(0, 3))
def test_answer_spans(tiny_ds, tiny_processors, labels, n_teachers, target, seed):
    from vlmlab.chat import caption_text, grounding_text
    root, recs = tiny_ds
    tok, ip = tiny_processors
    pool = [dict(r, objects=[dict(o, label=lab) for o, lab in zip(r['objects'], ls)]) for r, ls in zip(recs[:4], labels)]
    proc = ChatProcessor(tok, ip, 'qwen2_5_vl', root, target=target, teacher_ratio=1.0 if n_teachers else 0.0,
                         n_teachers=max(1, n_teachers), teacher_pool=pool if n_teachers else None, seed=seed)
    rec = pool[0]
    examples = proc.teachers_for(rec) + [rec]
    markup = [r['id'] for r in examples if any(t in o['label'] for o in r['objects'] for t in MARKUP)]
    try: s = proc(rec)
    except ChatError as e:
        assert markup and f"sample '{markup[0]}': the special token" in str(e), str(e); return
    assert not markup, f'chat markup in the labels of {markup} was accepted'
    answer = (lambda r: grounding_text(r['objects'], tuple(r['size']), 'qwen2_5_vl')) if target == 'grounding' else \
             (lambda r: caption_text(r['objects']))
    assert len(s.spans['teacher']) == len(examples) - 1 and len(s.spans['student']) == 1
    spans = s.spans['teacher'] + s.spans['student']
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))
    for (a, b), r in zip(spans, examples):
        assert tok.decode(s.input_ids[a:b]) == unicodedata.normalize('NFC', answer(r)) + IM_END   # the tokenizer normalizes NFC
    covered = torch.zeros(len(s), dtype=torch.bool)
    for a, b in spans: covered[a:b] = True
    assert torch.equal(s.labels != -100, covered)


@case('packed batch sampler across ranks and epochs', 'every rank gets the same number of packs, no pack twice, at most world_size-1 '
      'dropped; each epoch a reproducible order')
@fuzz(500)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60), cap=st.integers(300, 900), world=st.integers(1, 4),
       epoch=st.integers(0, 5), seed=st.integers(0, 10))
def test_packed_batch_sampler_shards(lengths, cap, world, epoch, seed):
    shards = []
    for rank in range(world):
        s = PackedBatchSampler(lengths, cap, seed=seed, rank=rank, world_size=world); s.set_epoch(epoch)
        shards.append([tuple(p) for p in s])
        assert len(shards[-1]) == len(s)
        again = PackedBatchSampler(lengths, cap, seed=seed, rank=rank, world_size=world); again.set_epoch(epoch)
        assert [tuple(p) for p in again] == shards[-1]
    seen = [p for sh in shards for p in sh]
    assert len(set(seen)) == len(seen) and len({len(sh) for sh in shards}) == 1
    n_packs = len(PackedBatchSampler(lengths, cap).packs)
    assert n_packs - len(seen) < world
    assert all(sum(lengths[i] for i in p) <= cap for p in seen)


@st.composite
def loose_samples(draw, idx: int) -> ProcessedSample:
    "A processed sample whose image tokens may or may not match its grids."
    n_text, n_pad = draw(st.integers(1, 12)), draw(st.integers(0, 12))
    grids = draw(st.lists(st.tuples(st.just(1), st.sampled_from([2, 4]), st.sampled_from([2, 4])), max_size=2))
    ids = torch.arange(10, 10 + n_text + n_pad)
    mm = torch.tensor([0] * n_text + [1] * n_pad, dtype=torch.int32)
    g = torch.tensor(grids) if grids else None
    rows = int(g.prod(-1).sum()) + draw(st.sampled_from([0, 0, 0, 1])) if grids else 0
    kind = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids))), dtype=torch.int32)
    return ProcessedSample(f's{idx}', ids, torch.where(kind > 0, ids, -100), mm, kind, torch.zeros(rows, 3) if grids else None, g, {}, [])


@case('collators on samples with inconsistent image tokens, grids and pixel rows', 'a batch that passes its checks, or CollatorError '
      'naming the sample; never IndexError / StopIteration')
@fuzz(400)
@given(data=st.data(), packed=st.booleans(), multiple=st.sampled_from([None, 8]))
def test_collators_only_raise_collator_errors(data, packed, multiple):
    batch = [data.draw(loose_samples(k)) for k in range(data.draw(st.integers(0, 3)))]
    collator = PackedDataCollator(0, pad_to_multiple_of=multiple) if packed else StandardDataCollator(0, pad_to_multiple_of=multiple)
    try: out = collator(batch)
    except CollatorError as e:
        assert not batch or any(f"sample '{s.id}'" in str(e) for s in batch) or 'pixel_values' in str(e) or 'empty batch' in str(e), str(e)
        return
    if packed: assert_packed_batch(out)
    assert out['labels'].shape == out['input_ids'].shape
