"""Qwen3.5 / Qwen3.6 tokens, thinking template, labels and start-up guards, on the tiny kit (hypothesis properties)."""
import unicodedata
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

from vlmlab.chat import ChatError, ChatProcessor, check_vision_parts
from vlmlab.families import FAMILIES, parameter_group
from vlmlab.tiny import HYBRID_FAMILIES, KIT_FAMILIES, VLM_FAMILIES, tiny_image_processor, tiny_kit
from vlmlab.tokens import (IM_END, THINK_END, THINK_START, SpecialTokenError, TemplateRefusal, assert_generation_stops,
                           assert_special_tokens, assert_template_matches, chat_format, chat_format_of, chatml_segments,
                           generation_prompt, qwen_chat_template, render_chatml, special_layout)

THINKING = tuple(f for f in FAMILIES if FAMILIES[f].thinking)
TOKENIZERS = {fam: AutoTokenizer.from_pretrained(tiny_kit(fam)) for fam in THINKING}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TEXT = st.text(st.characters(blacklist_categories=('Cs',)), max_size=24).filter(lambda s: '<|' not in s and '<think>' not in s
                                                                               and '</think>' not in s)
WS = st.sampled_from(['', ' ', '\n', '  \n', '\t'])
PADDED = st.builds(lambda a, t, b: a + t + b, WS, TEXT, WS)
PART = st.one_of(st.builds(lambda t: {'type': 'text', 'text': t}, PADDED), st.just({'type': 'image'}), st.just({'type': 'video'}))
CONTENT = st.one_of(PADDED, st.lists(PART, max_size=3))
TEXT_PARTS = st.lists(st.builds(lambda t: {'type': 'text', 'text': t}, PADDED), max_size=3)   # answers: no images (refused in training)


@st.composite
def answers(draw, anything: bool = False):
    "An assistant turn: plain, with reasoning_content, or with the reasoning written inline."
    how, text = draw(st.sampled_from(['plain', 'field', 'inline'])), draw(PADDED)
    if how == 'plain': return {'role': 'assistant', 'content': draw(CONTENT if anything else st.one_of(PADDED, TEXT_PARTS))}
    if how == 'field': return {'role': 'assistant', 'content': text, 'reasoning_content': draw(PADDED)}
    return {'role': 'assistant', 'content': f"{draw(WS)}{THINK_START}{draw(PADDED)}{THINK_END}{text}"}


@st.composite
def conversations(draw, valid: bool = True):
    msgs = [{'role': 'system', 'content': draw(CONTENT if not valid else PADDED)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({'role': 'user', 'content': draw(CONTENT)})
        msgs.append(draw(answers(anything=not valid)))
        if not valid and draw(st.integers(0, 4)) == 0: msgs.append({'role': 'system', 'content': 'late'})
    if not valid and draw(st.booleans()): msgs = [m for m in msgs if m['role'] != 'user']
    return msgs


def _render_or_refusal(fn):
    try: return fn()
    except Exception as e: return ('refused', type(e).__name__)


@pytest.mark.parametrize('family', THINKING)
@pytest.mark.parametrize('think_by_default', [True, False])
@SETTINGS
@given(conv=conversations(valid=False), gen=st.booleans(), think=st.sampled_from([None, True, False]), vision_id=st.booleans())
def test_renderer_equals_kit_template_or_both_refuse(family, think_by_default, conv, gen, think, vision_id):
    tok = TOKENIZERS[family]
    fmt = replace(chat_format(family), think_by_default=think_by_default)
    kw = {} if think is None else {'enable_thinking': think}
    ours = _render_or_refusal(lambda: render_chatml(conv, fmt, add_generation_prompt=gen, add_vision_id=vision_id, enable_thinking=think))
    theirs = _render_or_refusal(lambda: tok.apply_chat_template(conv, chat_template=qwen_chat_template(fmt), tokenize=False,
                                                                add_generation_prompt=gen, add_vision_id=vision_id, **kw))
    if isinstance(ours, tuple) or isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and isinstance(theirs, tuple), (ours, theirs)
        assert ours[1] in ('TemplateRefusal', 'ValueError')
    else: assert ours == theirs


@pytest.mark.parametrize('family', THINKING)
@SETTINGS
@given(conv=conversations())
def test_generation_prompt_is_the_training_prefix(family, conv):
    "The stored prompt is the text before the last answer's first target: the open block for reasoning, the closed one without."
    segs = chatml_segments(conv, family)
    last = len(conv) - 1
    first = next((k for k, s in enumerate(segs) if s.message == last and s.target), None)
    if first is None: return   # an empty answer has no target (ChatProcessor refuses it)
    assert ''.join(s.text for s in segs[:first]) == generation_prompt(conv, family)
    closed = [s for s in segs if s.message == last and s.text == f"{THINK_START}\n\n{THINK_END}\n\n"]
    assert all(not s.target for s in closed)


@pytest.mark.parametrize('family', THINKING)
@SETTINGS
@given(conv=conversations().filter(lambda c: all(isinstance(m['content'], str) for m in c)))
def test_chat_processor_labels_are_exactly_the_answers(family, conv):
    tok = TOKENIZERS[family]
    proc = ChatProcessor(tok, tiny_image_processor(family), family, '.', target='conversation', check_placeholders=False)
    try: s = proc({'id': 'p', 'conversations': conv})
    except ChatError as e:
        assert 'no label tokens' in str(e); return
    assert s.input_ids.tolist() == tok.apply_chat_template(conv, tokenize=True, return_dict=True)['input_ids']
    expected = ''.join(seg.text for seg in chatml_segments(conv, family) if seg.target)
    expected = unicodedata.normalize('NFC', expected)   # the tokenizer normalizes as the Qwen tokenizers do (e.g. U+1D1BB decomposes)
    assert tok.decode(s.labels[s.labels != -100]) == expected
    think_ids = {tok.convert_tokens_to_ids(THINK_START)}
    assert not any(int(i) in think_ids for i in s.labels)   # <think> always opens the prompt side


@pytest.mark.parametrize('family', THINKING)
def test_kit_layout_and_guards(family):
    path = tiny_kit(family)
    tok, cfg = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    ids = assert_special_tokens(tok, cfg)
    assert {t: ids[t] for t in special_layout(family)} == special_layout(family)
    assert cfg.text_config.vocab_size == FAMILIES[family].vocab_size > max(ids.values())
    q2 = AutoTokenizer.from_pretrained(tiny_kit(VLM_FAMILIES[0]))
    with pytest.raises(SpecialTokenError, match='<think> is not a single token'): assert_special_tokens(q2, family=family)
    with pytest.raises(SpecialTokenError, match='layout'): assert_special_tokens(tok, family=VLM_FAMILIES[0])
    assert assert_template_matches(tok, chat_format_of(tok, family)) == 20
    assert 'answers end at <|im_end|>' in assert_generation_stops(tok, cfg, GenerationConfig.from_pretrained(path))
    with pytest.raises(SpecialTokenError, match='writes on into a new turn'): assert_generation_stops(tok, cfg)


@pytest.mark.parametrize('family', HYBRID_FAMILIES)
def test_kit_models_keep_the_layer_pattern(family):
    assert family in KIT_FAMILIES and family not in VLM_FAMILIES
    model = AutoModelForImageTextToText.from_pretrained(tiny_kit(family))
    assert model.config.text_config.layer_types == ['linear_attention'] * 3 + ['full_attention']
    groups = {parameter_group(n) for n, _ in model.named_parameters()}
    assert {'experts', 'router'} <= groups if FAMILIES[family].moe else not {'experts', 'router'} & groups
    assert any('linear_attn' in n for n, _ in model.named_parameters()) and any('self_attn' in n for n, _ in model.named_parameters())
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.model.language_model.layers[3].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize('family', THINKING)
@pytest.mark.parametrize('conv, words', [
    ([{'role': 'system', 'content': [{'type': 'image'}]}, {'role': 'user', 'content': 'Hi'}], 'System message cannot contain images'),
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'system', 'content': 'Late.'}], 'System message must be at the beginning'),
    ([{'role': 'assistant', 'content': 'Hello.'}], 'No user query found in messages'),
])
def test_refused_like_the_template(family, conv, words):
    with pytest.raises(TemplateRefusal, match=words): render_chatml(conv, family)
    with pytest.raises(Exception, match=words): TOKENIZERS[family].apply_chat_template(conv, tokenize=False)
    with pytest.raises(ChatError, match=words): check_vision_parts({'id': 'x'}, conv, [{}] * sum(
        isinstance(m['content'], list) for m in conv), family)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_image_in_an_answer_is_refused_for_every_family(family):
    conv = [{'role': 'user', 'content': 'Draw it.'}, {'role': 'assistant', 'content': [{'type': 'image'}]}]
    with pytest.raises(ChatError, match='image 1 is in an assistant turn'): check_vision_parts({'id': 'x'}, conv, [{}], family)
