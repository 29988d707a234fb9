"""Several images per sample and text-only samples mixed with image samples: labels, mRoPE positions, the image-token guard,
pixels in token order, packed == solo == padded, batches without any image, and the refusals of what cannot work."""
import json
import re
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from vlmlab.chat import ChatError, ChatProcessor, caption_text, check_vision_parts, sample_html
from vlmlab.collators import (CollatorError, PackedDataCollator, StandardDataCollator, assert_packed_batch, check_batch_images,
                              modality_runs, model_inputs, mrope_position_ids, vision_keepalive)
from vlmlab.data import IMAGE_KEYS, convert, make_shapes, read_jsonl, record_images
from vlmlab.tiny import VLM_FAMILIES, tiny_kit
from vlmlab.tokens import IM_END, VISION_END, VISION_START, expand_image_pads
from vlmlab.trainer import TrainingCollator
from vlmlab.vision import ResizeSpec

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def llava_items(imgs):
    "A LLaVA file mixing every shape: text-only, one image, two images (one of them adjacent), three images."
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    return [{'id': 'text-only', 'conversations': turn('Name a shape with three corners.', 'a triangle')},
            {'id': 'two-image', 'image': imgs[:2], 'conversations': turn('Compare <image> with <image>.', 'They differ.')},
            {'id': 'one-image', 'image': imgs[2], 'conversations': turn('<image>\nDescribe the image.', 'Coloured shapes.')},
            {'id': 'three-image', 'image': [imgs[3], imgs[0], imgs[4]],
             'conversations': turn('<image><image>\nand then <image>: which differs?', 'The last one.')
                              + turn('Why?', 'It has other colours.')},
            {'id': 'text-only-2', 'conversations': turn('Say hello.', 'hello') + turn('Again.', 'hello again')}]


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Per family: converted one-image shapes records, the mixed LLaVA records, tokenizer, processor and tiny model."
    d = tmp_path_factory.mktemp('multi')
    make_shapes(d / 'raw', n=6, seed=3, old_format=0, size_range=(80, 300))
    imgs = sorted(p.name for p in (d / 'raw').iterdir() if p.suffix != '.json')
    (d / 'mixed.json').write_text(json.dumps(llava_items(imgs)))
    out = {}
    for fam in VLM_FAMILIES:
        spec = ResizeSpec.from_pretrained(tiny_kit(fam))
        s1 = convert(d / 'raw', d / fam, spec, progress=False)
        s2 = convert(d / 'mixed.json', d / fam, spec, split='mixed', image_root=d / 'raw', progress=False)
        assert s1.balanced and s2.balanced and not s1.rejected and not s2.rejected, (s1, s2)
        shapes = [r for _, r, _ in read_jsonl(d / fam / 'train.jsonl')]
        mixed = {r['id']: r for _, r, _ in read_jsonl(d / fam / 'mixed.jsonl')}
        tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
        model = AutoModelForImageTextToText.from_pretrained(tiny_kit(fam), attn_implementation='sdpa').eval()
        proc = ChatProcessor(tok, ip, fam, d / fam, target='conversation')
        out[fam] = dict(root=d / fam, shapes=shapes, mixed=mixed, tok=tok, ip=ip, model=model, proc=proc, spec=spec)
    return out


def solo_out(model, s):
    with torch.no_grad():
        return model(input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None], pixel_values=s.pixel_values,
                     image_grid_thw=s.image_grid_thw, labels=s.labels[None], use_cache=False)


def token_mean(outs, samples):
    n = [int((s.labels[1:] != -100).sum()) for s in samples]
    return sum(o.loss.item() * k for o, k in zip(outs, n)) / sum(n)


# ---- the records really are the three shapes

def test_converted_shapes(world):
    mixed = world['qwen2_5_vl']['mixed']
    assert {k: len(record_images(r)) for k, r in mixed.items()} == \
        {'text-only': 0, 'two-image': 2, 'one-image': 1, 'three-image': 3, 'text-only-2': 0}
    assert 'image' in mixed['one-image'] and 'images' in mixed['two-image'] and not {'image', 'images'} & set(mixed['text-only'])


# ---- packing: a mixed pack equals the solo runs and the padded batch, in every family

@pytest.mark.parametrize('family', VLM_FAMILIES)
@pytest.mark.parametrize('order', [('text-only', 'two-image', 'one-image'),
                                   ('three-image', 'text-only', 'one-image', 'text-only-2', 'two-image')])
def test_mixed_pack_equals_solo_and_padded(world, family, order):
    w = world[family]
    ss = [w['proc'](w['mixed'][k]) for k in order]
    packed = PackedDataCollator(w['tok'].pad_token_id, pad_to_multiple_of=16)(ss)
    padded = StandardDataCollator(w['tok'].pad_token_id, pad_to_multiple_of=16)(ss)
    assert packed['image_grid_thw'].tolist() == [g for s in ss if s.image_grid_thw is not None for g in s.image_grid_thw.tolist()]
    assert torch.equal(packed['pixel_values'], torch.cat([s.pixel_values for s in ss if s.pixel_values is not None]))
    with torch.no_grad():
        out_pk, out_pd = w['model'](**model_inputs(packed)), w['model'](**model_inputs(padded))
    solos = [solo_out(w['model'], s) for s in ss]
    cu = packed['cu_seqlens'].tolist()
    for i, (s, o) in enumerate(zip(ss, solos)):
        assert (out_pk.logits[0, cu[i]:cu[i + 1]] - o.logits[0]).abs().max().item() < 1e-5, (family, s.id, 'packed')
        assert (out_pd.logits[i, :len(s)] - o.logits[0]).abs().max().item() < 1e-5, (family, s.id, 'padded')
    assert abs(out_pk.loss.item() - out_pd.loss.item()) < 1e-5
    assert abs(out_pk.loss.item() - token_mean(solos, ss)) < 1e-5


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_mixed_pack_gradients_equal_padded(world, family):
    w = world[family]
    ss = [w['proc'](w['mixed'][k]) for k in ('text-only', 'two-image', 'one-image')]
    grads = []
    for batch in (PackedDataCollator(w['tok'].pad_token_id)(ss), StandardDataCollator(w['tok'].pad_token_id)(ss)):
        model = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), attn_implementation='sdpa').train()
        model(**model_inputs(batch)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and (grads[0] - grads[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_mrope_equals_get_rope_index_with_none_one_and_several_images(world, family):
    w = world[family]
    for rec in w['mixed'].values():
        s = w['proc'](rec)
        ref, _ = w['model'].model.get_rope_index(s.input_ids[None], s.mm_token_type_ids[None], image_grid_thw=s.image_grid_thw)
        assert torch.equal(mrope_position_ids(s.mm_token_type_ids, s.image_grid_thw), ref[:, 0]), (family, s.id)


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_batches_without_any_image(world, family):
    w = world[family]
    ss = [w['proc'](w['mixed'][k]) for k in ('text-only', 'text-only-2')]
    solos = [solo_out(w['model'], s) for s in ss]
    for collator in (StandardDataCollator(w['tok'].pad_token_id), PackedDataCollator(w['tok'].pad_token_id, pad_to_multiple_of=8),
                     TrainingCollator(w['tok'], packed=True, max_tokens=4096), TrainingCollator(w['tok'])):
        batch = collator(ss)
        assert 'pixel_values' not in batch and 'image_grid_thw' not in batch, type(collator).__name__
        with torch.no_grad(): loss = w['model'](**model_inputs(batch)).loss.item()
        assert abs(loss - token_mean(solos, ss)) < 1e-5, type(collator).__name__


def test_training_collator_packs_of_mixed_shapes(world):
    w = world['qwen2_5_vl']
    m = w['mixed']
    packs = [[w['proc'](m['text-only']), w['proc'](m['two-image'])], [w['proc'](m['one-image'])]]
    batch = TrainingCollator(w['tok'], packed=True, max_tokens=2048)(packs)
    assert_packed_batch(batch)
    assert batch['sample_ids'] == ['text-only', 'two-image', 'one-image'] and len(batch['image_grid_thw']) == 3


# ---- labels: exactly the answers, for any number of images anywhere in the user turns

TEXT = st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='<>'), min_size=0, max_size=20)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), n_images=st.integers(0, 3), answers=st.lists(TEXT, min_size=1, max_size=3))
def test_labels_are_exactly_the_answers_with_any_images(world, data, n_images, answers):
    fam = 'qwen2_5_vl'
    w = world[fam]
    entries = [record_images(w['shapes'][data.draw(st.integers(0, len(w['shapes']) - 1))])[0] for _ in range(n_images)]
    turns = [[{'type': 'text', 'text': data.draw(TEXT)}] for _ in answers]   # the user turns' text, images go in below
    for _ in range(n_images):
        u = data.draw(st.integers(0, len(turns) - 1))
        turns[u].insert(data.draw(st.integers(0, len(turns[u]))), {'type': 'image'})
    conv = []
    for parts, a in zip(turns, answers): conv += [{'role': 'user', 'content': parts}, {'role': 'assistant', 'content': a}]
    rec = {'id': 'h', 'resize': w['shapes'][0]['resize'], 'box_format': 'xyxy_px', 'objects': [], 'conversations': conv,
           'source': 'hypothesis', 'split': 'train'}
    if n_images == 1: rec.update(entries[0])
    elif n_images > 1: rec['images'] = entries
    s = w['proc'](rec)
    # the tokenizer normalizes text to NFC (as Qwen's does), so the decoded labels are the NFC form of the answers
    assert w['tok'].decode(s.labels[s.labels != -100]) == unicodedata.normalize('NFC', ''.join(a + IM_END for a in answers))
    assert torch.equal(s.labels != -100, s.label_kind == 2)
    assert bool((s.labels[s.mm_token_type_ids != 0] == -100).all())
    vs = w['tok'].convert_tokens_to_ids(VISION_START)
    assert s.input_ids.tolist().count(vs) == n_images
    if n_images == 0:
        assert s.pixel_values is None and s.image_grid_thw is None
    else:   # grid k is stored image k, its pixels and its own run of image tokens
        p = w['spec'].patch_size
        assert [[gw * p, gh * p] for _, gh, gw in s.image_grid_thw.tolist()] == [e['size'] for e in entries]
        assert s.pixel_values.shape[0] == int(s.image_grid_thw.prod(-1).sum())
        runs = mrope_position_ids(s.mm_token_type_ids, s.image_grid_thw)   # raises if a run does not fit its grid
        assert runs.shape == (3, len(s))
    ref = w['tok'](expand_image_pads(w['tok'].apply_chat_template(conv, tokenize=False), s.image_grid_thw if n_images else [], 2),
                   add_special_tokens=False)['input_ids']
    assert s.input_ids.tolist() == ref


@settings(max_examples=80, **SETTINGS)
@given(ids=st.lists(st.sampled_from(['text-only', 'two-image', 'one-image', 'three-image', 'text-only-2']), min_size=1, max_size=6),
       packed=st.booleans(), multiple=st.sampled_from([None, 8]))
def test_collated_images_are_in_token_order(world, ids, packed, multiple):
    w = world['qwen2_vl']
    ss = [w['proc'](w['mixed'][k]) for k in ids]
    col = PackedDataCollator(0, pad_to_multiple_of=multiple) if packed else StandardDataCollator(0, pad_to_multiple_of=multiple)
    batch = col(ss)
    grids = [g for s in ss if s.image_grid_thw is not None for g in s.image_grid_thw.tolist()]
    assert (batch.get('image_grid_thw').tolist() if 'image_grid_thw' in batch else []) == grids
    check_batch_images(batch)
    if len({tuple(g) for g in grids}) > 1:   # any reordering of grids of different sizes is refused
        perm = list(range(len(grids)))[::-1]
        while [grids[i] for i in perm] == grids: perm = perm[1:] + perm[:1]
        bad = dict(batch, image_grid_thw=torch.tensor([grids[i] for i in perm]))
        with pytest.raises(CollatorError, match='not in the order of the images'):
            check_batch_images(bad)


# ---- the naive version: pixels out of order run silently in transformers

def test_pixels_out_of_order_are_silent_in_the_model_and_refused_by_vlmlab(world):
    w = world['qwen2_5_vl']
    s = w['proc'](w['mixed']['two-image'])
    g = s.image_grid_thw
    assert g[0].tolist() != g[1].tolist()
    n0 = int(g[0].prod())
    swapped_pv, swapped_g = torch.cat([s.pixel_values[n0:], s.pixel_values[:n0]]), g.flip(0)
    with torch.no_grad():
        bad = w['model'](input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None], pixel_values=swapped_pv,
                         image_grid_thw=swapped_g, use_cache=False).logits
    assert (bad - solo_out(w['model'], s).logits).abs().max().item() > 1e-2   # no error, different logits
    batch = StandardDataCollator(w['tok'].pad_token_id)([s])
    with pytest.raises(CollatorError, match=r"image 0 of the batch \(sample 'two-image'\)"):
        check_batch_images(dict(batch, pixel_values=swapped_pv, image_grid_thw=swapped_g))
    with pytest.raises(CollatorError, match='rows but the grids need'):
        check_batch_images(dict(batch, pixel_values=s.pixel_values[:-1]))
    with pytest.raises(CollatorError, match='hold 2 images but image_grid_thw lists 1'):
        check_batch_images(dict(batch, image_grid_thw=g[:1]))


# ---- refusals of what cannot work, each naming the sample and the reason

@pytest.mark.parametrize('target', ['grounding', 'caption'])
@pytest.mark.parametrize('rid,shape', [('two-image', 'a 2-image record'), ('three-image', 'a 3-image record'), ('text-only', 'text-only')])
def test_box_and_caption_targets_need_one_image(world, target, rid, shape):
    w = world['qwen2_5_vl']
    proc = ChatProcessor(w['tok'], w['ip'], 'qwen2_5_vl', w['root'], target=target)
    with pytest.raises(ChatError, match=f"sample '{rid}': target '{target}' needs a one-image record .* this one is {shape}"):
        proc(w['mixed'][rid])
    assert proc(w['shapes'][0]).n_label_tokens > 0   # one-image records still work


def test_refusals_name_the_sample_and_the_problem(world):
    w = world['qwen2_5_vl']
    m, proc = w['mixed'], w['proc']
    cases = [
        (dict(m['two-image'], images=m['two-image']['images'][:1]), 'hold 2 image part.* record has 1 image'),
        (dict(m['three-image'], images=m['three-image']['images'] + m['two-image']['images']), 'hold 3 image part.* record has 5 image'),
        ({**{k: v for k, v in m['two-image'].items() if k != 'images'}, **record_images(m['one-image'])[0]}, 'hold 2 image part.* has 1'),
        (dict(m['text-only'], **record_images(m['one-image'])[0]), 'hold 0 image part.* record has 1 image'),
        (dict(m['two-image'], objects=w['shapes'][0]['objects']), 'grounding objects on a 2-image record'),
        (dict(m['text-only'], objects=w['shapes'][0]['objects']), 'grounding objects on text-only'),
        (dict(m['two-image'], image=m['one-image']['image']), "both 'image' and 'images'"),
        (dict(m['text-only'], conversations=[{'role': 'user', 'content': [{'type': 'video'}]}, {'role': 'assistant', 'content': 'x'}]),
         'video part'),
        (dict(m['one-image'], conversations=[{'role': 'system', 'content': [{'type': 'image'}]},
                                             {'role': 'user', 'content': 'What is it?'}, {'role': 'assistant', 'content': 'x'}]),
         'image 1 is in the system message'),
        (dict(m['two-image'], images=[dict(e, image='../escape.png') for e in m['two-image']['images']]), 'image 1 of 2: image path'),
    ]
    for rec, msg in cases:
        with pytest.raises(ChatError, match=f"sample '{rec['id']}'.*{msg}"):
            proc(rec)


def test_image_parts_are_counted_as_the_renderer_reads_them(world):
    parts = [{'role': 'user', 'content': [{'image_url': 'a.png'}, {'type': 'text', 'text': 'and'}, {'image': 'b.png'}]},
             {'role': 'assistant', 'content': 'ok'}]
    check_vision_parts({'id': 'r'}, parts, [{}, {}])
    with pytest.raises(ChatError, match="sample 'r': its messages hold 2 image part"):
        check_vision_parts({'id': 'r'}, parts, [{}])


def test_grounding_teachers_are_one_image_records(world):
    w = world['qwen2_5_vl']
    pool = list(w['mixed'].values()) + w['shapes']
    proc = ChatProcessor(w['tok'], w['ip'], 'qwen2_5_vl', w['root'], teacher_ratio=1.0, teacher_pool=pool, n_teachers=3)
    drawn = {t['id'] for r in w['shapes'] for e in range(5) for t in proc.teachers_for(r, e)}
    assert drawn and all(len(record_images(r)) == 1 for r in pool if r['id'] in drawn)
    conv = ChatProcessor(w['tok'], w['ip'], 'qwen2_5_vl', w['root'], target='conversation', teacher_ratio=1.0,
                         teacher_pool=list(w['mixed'].values()), n_teachers=2, seed=1)
    s = conv(w['mixed']['text-only'])   # a text-only student after multi-image teachers: all images in order, one span each
    teachers = conv.teachers_for(w['mixed']['text-only'])
    assert teachers and (s.image_grid_thw.tolist() if s.image_grid_thw is not None else []) == \
        [g for t in teachers for g in conv(t).image_grid_thw.tolist()[-len(record_images(t)):] if record_images(t)]
    assert w['tok'].decode(s.input_ids[slice(*s.spans['student'][-1])]) == 'a triangle' + IM_END


def test_text_only_truncation_and_display(world):
    w = world['qwen2_5_vl']
    full = w['proc'](w['mixed']['text-only-2'])
    cut = ChatProcessor(w['tok'], w['ip'], 'qwen2_5_vl', w['root'], max_length=len(full) - 3, target='conversation')(w['mixed']['text-only-2'])
    assert cut.truncated == 3 and len(cut) == len(full) - 3 and cut.pixel_values is None
    html = sample_html(full)
    assert '<img' not in html and '0 image(s)' in html
    three = w['proc'](w['mixed']['three-image'])   # two adjacent images: one collapsed span each
    html = sample_html(three)
    counts = [t * h * wd // 4 for t, h, wd in three.image_grid_thw.tolist()]
    assert html.count('&lt;|image_pad|&gt;×') == 3 and all(f'&lt;|image_pad|&gt;×{n}&lt;|vision_end|&gt;' in html for n in counts)
    assert html.count('<img') == 1 and '3 image(s)' in html
    assert VISION_END + VISION_START in ''.join(three.pieces)


# ---- a batch without images still reaches every vision parameter (stage 1, DDP, the trainable-set check)

@pytest.mark.parametrize('family', VLM_FAMILIES)
@pytest.mark.parametrize('trainable', ['visual.merger', 'visual'])
def test_vision_keepalive_gives_zero_gradients_and_changes_nothing(world, family, trainable):
    w = world[family]
    batch = PackedDataCollator(w['tok'].pad_token_id)([w['proc'](w['mixed'][k]) for k in ('text-only', 'text-only-2')])
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), attn_implementation='sdpa').train()
    for n, p in vlm.named_parameters(): p.requires_grad_(trainable in n)
    out = vlm(**model_inputs(batch))
    with pytest.raises(RuntimeError, match='does not require grad'):   # the naive text-only step in a vision-only stage
        out.loss.backward(retain_graph=True)
    keep = vision_keepalive(vlm)
    total = out.loss + keep
    assert total.item() == out.loss.item() and keep.item() == 0.0
    total.backward()
    grads = {n: p.grad for n, p in vlm.named_parameters() if trainable in n}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert max(g.abs().max().item() for g in grads.values()) == 0.0


# ---- the image-token guard counts per image, not in total

def test_a_token_moved_between_two_images_is_refused_per_image(world):
    from vlmlab.tokens import mm_token_type_ids
    from vlmlab.vision import ImageTokenError, assert_image_tokens
    w = world['qwen2_5_vl']
    s = w['proc'](w['mixed']['two-image'])
    (_, a1, b1), (_, a2, b2) = [r for r in modality_runs(s.mm_token_type_ids) if r[0] == 1]
    ids = s.input_ids.tolist()
    pad = ids[a1]
    del ids[b1 - 1]; ids.insert(a2 - 1, pad)     # image 1 loses a pad, image 2 gains one: same length, same total
    bad_ids = torch.tensor(ids)
    bad_mm = mm_token_type_ids(bad_ids, w['model'].config)
    assert int(bad_mm.sum()) == int(s.mm_token_type_ids.sum())   # the totals agree: transformers' only check
    with torch.no_grad():   # runs without an error
        w['model'](input_ids=bad_ids[None], mm_token_type_ids=bad_mm[None], pixel_values=s.pixel_values,
                   image_grid_thw=s.image_grid_thw, use_cache=False)
    with pytest.raises(ImageTokenError, match=r"sample 'two-image': image 0 with grid .* needs \d+ <\|image_pad\|> tokens"):
        assert_image_tokens(ids, s.image_grid_thw.tolist(), w['tok'], 2, 'two-image')
    broken = type(s)(s.id, bad_ids, s.labels, bad_mm, s.label_kind, s.pixel_values, s.image_grid_thw, s.spans, s.roles)
    for collator in (StandardDataCollator(w['tok'].pad_token_id), PackedDataCollator(w['tok'].pad_token_id)):
        with pytest.raises(CollatorError, match=r"sample 'two-image': an image run of \d+ tokens does not match its grid"):
            collator([w['proc'](w['mixed']['text-only']), broken])


def test_padding_and_boundaries_carry_no_labels(world):
    w = world['qwen3_vl']
    ss = [w['proc'](w['mixed'][k]) for k in ('two-image', 'text-only', 'one-image')]
    padded = StandardDataCollator(w['tok'].pad_token_id, pad_to_multiple_of=32)(ss)
    for i, s in enumerate(ss):
        assert torch.equal(padded['labels'][i, :len(s)], s.labels) and bool((padded['labels'][i, len(s):] == -100).all())
        assert bool((padded['mm_token_type_ids'][i, len(s):] == 0).all())
    packed = PackedDataCollator(w['tok'].pad_token_id, pad_to_multiple_of=32)(ss)
    cu = packed['cu_seqlens'].tolist()
    assert bool((packed['labels'][0, cu[:-1]] == -100).all()) and bool((packed['labels'][0, cu[len(ss)]:] == -100).all())
    kept = packed['labels'][0, :cu[len(ss)]] != -100
    assert int(kept.sum()) == sum(int((s.labels[1:] != -100).sum()) for s in ss)   # first tokens of samples are never labels anyway


# ---- a one-image record with empty objects but boxes in its answers never trains the answer '[]' / 'nothing'

def unlabelled_llava(d, img):
    "A LLaVA file: answer boxes without labels (conversion leaves objects empty), a labelled answer, a box only in the question."
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    return [{'id': 'unlabelled', 'image': img, 'conversations': turn('<image>\nWhere are the shapes?', '[{"bbox_2d": [10, 12, 60, 70]}]')},
            {'id': 'labelled', 'image': img, 'conversations': turn('<image>\nWhere are the shapes?',
                                                                 '[{"bbox_2d": [10, 12, 60, 70], "label": "red square"}]')},
            {'id': 'asked', 'image': img, 'conversations': turn('<image>\nWhat is in [10, 12, 60, 70]? {"bbox_2d": [10, 12, 60, 70]}',
                                                              'a red square')}]


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_empty_objects_with_answer_boxes_are_refused_for_box_and_caption_targets(world, family, tmp_path):
    w = world[family]
    raw = w['root'].parent / 'raw'
    img = sorted(p.name for p in raw.iterdir() if p.suffix != '.json')[0]
    (tmp_path / 'in.json').write_text(json.dumps(unlabelled_llava(tmp_path, img)))
    s = convert(tmp_path / 'in.json', tmp_path / 'ds', w['spec'], image_root=raw, progress=False)
    assert s.written == 3 and not s.rejected, s
    recs = {r['id']: r for _, r, _ in read_jsonl(tmp_path / 'ds' / 'train.jsonl')}
    bad = recs['unlabelled']
    assert bad['objects'] == [] and any(n.startswith('answer boxes without a label') for n in bad.get('notes', []))
    for target in ('grounding', 'caption'):
        proc = ChatProcessor(w['tok'], w['ip'], family, tmp_path / 'ds', target=target)
        empty = "None" if (target, family) == ('grounding', 'qwen2_vl') else '[]' if target == 'grounding' else 'nothing'
        with pytest.raises(ChatError, match=rf"sample 'unlabelled': target '{target}' would train the answer '{re.escape(empty)}'.*1 box\(es\)"
                                            r".*conversion noted: answer boxes without a label.*label every box.*target 'conversation'"):
            proc(bad)
        assert not proc.usable(bad) and proc.usable(recs['labelled']) and proc.usable(recs['asked'])
        lab = proc(recs['labelled'])   # the labelled answer trains its object; a box asked about is no object
        assert 'red square' in w['tok'].decode(lab.input_ids[slice(*lab.spans['student'][0])])
        assert proc(recs['asked']).n_label_tokens > 0
        # the same record without the conversion's note is refused all the same: the boxes are read from the answers
        with pytest.raises(ChatError, match="sample 'unlabelled'.*would train the answer"):
            proc({k: v for k, v in bad.items() if k != 'notes'})
        # teacher draws skip it: a grounding teacher must show its objects, not '[]' over an image with boxes
        teach = ChatProcessor(w['tok'], w['ip'], family, tmp_path / 'ds', target=target, teacher_ratio=1.0,
                              teacher_pool=list(recs.values()), n_teachers=3)
        drawn = {t['id'] for e in range(6) for t in teach.teachers_for(recs['labelled'], e)}
        assert drawn == {'asked'}, drawn
        assert teach(recs['labelled']).spans['teacher']
    conv = ChatProcessor(w['tok'], w['ip'], family, tmp_path / 'ds', target='conversation')
    s = conv(bad)   # its own answer, boxes and all, is a fine conversation target
    assert 'bbox_2d' in w['tok'].decode(s.input_ids[slice(*s.spans['student'][0])])
