"""Property tests of the ChatML renderer against the tokenizer's own chat template (hypothesis)."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmlab.tiny import VLM_FAMILIES, tiny_tokenizer
from vlmlab.tokens import (IM_END, IM_START, IMAGE_PAD, CompletionPrompts, ChatMarkupError, chatml_segments,
                           encode_base, encode_chatml, generation_prompt, render_chatml)

TOKENIZERS = {fam: tiny_tokenizer(fam) for fam in VLM_FAMILIES}
# text without ChatML markers, including unicode, newlines and braces that templates could mangle
TEXT = st.text(st.characters(blacklist_categories=('Cs',)), max_size=40).filter(lambda s: '<|' not in s)
PART = st.one_of(st.builds(lambda t: {'type': 'text', 'text': t}, TEXT), st.just({'type': 'image'}),
                 st.just({'type': 'video'}))
CONTENT = st.one_of(TEXT, st.lists(PART, min_size=1, max_size=4))


@st.composite
def conversations(draw):
    msgs = [{'role': 'system', 'content': draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({'role': 'user', 'content': draw(CONTENT)})
        msgs.append({'role': 'assistant', 'content': draw(CONTENT)})
    return msgs


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize('family', VLM_FAMILIES)
@SETTINGS
@given(conv=conversations(), gen=st.booleans(), vision_id=st.booleans())
def test_renderer_equals_chat_template(family, conv, gen, vision_id):
    tok = TOKENIZERS[family]
    if gen: conv = conv[:-1]
    ours = render_chatml(conv, family, add_generation_prompt=gen, add_vision_id=vision_id)
    theirs = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, add_vision_id=vision_id)
    assert ours == theirs


@SETTINGS
@given(conv=conversations())
def test_generation_prompt_is_prefix_and_targets_are_answers(conv):
    text, prompt = render_chatml(conv), generation_prompt(conv)
    assert text.startswith(prompt)
    segs = chatml_segments(conv)
    targets = ''.join(s.text for s in segs if s.target)
    expected = ''
    for m in conv:
        if m['role'] != 'assistant': continue
        c = m['content']
        body = c if isinstance(c, str) else ''.join(p.get('text', '') for p in c if 'text' in p)
        expected += body + IM_END
    assert targets == expected
    assert not any(s.target and s.kind in ('image', 'video') for s in segs)


@SETTINGS
@given(conv=conversations())
def test_encode_chatml_matches_tokenized_template(conv):
    tok = TOKENIZERS['qwen2_5_vl']
    ids = encode_chatml(tok, render_chatml(conv, 'qwen2_5_vl'))
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)['input_ids']
    n_img = sum(1 for m in conv if not isinstance(m['content'], str) for p in m['content'] if p.get('type') == 'image')
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_PAD)) == n_img


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_encode_base_never_carries_markup(text):
    tok = TOKENIZERS['qwen2_vl']
    ids = encode_base(tok, text)
    assert tok.convert_tokens_to_ids(IM_START) not in ids
    with pytest.raises(ChatMarkupError):
        encode_base(tok, text + IM_START + 'user\n')


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=20), seed=st.integers(0, 10**6), instruction=TEXT)
def test_completion_prompts_reproducible(key, seed, instruction):
    a, b = CompletionPrompts(seed=seed), CompletionPrompts(seed=seed)
    assert a.render(instruction, key) == b.render(instruction, key)
    assert 3 <= len(a.examples(key)) <= 4
    assert a.render(instruction, key).endswith(f'Instruction: {instruction}\nResponse:')
