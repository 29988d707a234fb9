"""smart_resize parity with the reference resizers and box round trips (property tests)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from vlmlab.vision import (COORD_SPACE, MAX_RATIO, ResizeError, ResizeSpec, boxes_from_model, boxes_to_model,
                           load_reference_smart_resize, scale_boxes, smart_resize)

QVU = load_reference_smart_resize()
SETTINGS = [(28, 3136, 12845056), (32, 65536, 16777216), (28, 50176, 200704), (28, 3136, 1003520)]


def random_sizes(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        h, w = np.exp(rng.uniform(np.log(10), np.log(9000), 2)).astype(int)
        if max(h, w) / min(h, w) <= MAX_RATIO: out.append((int(h), int(w)))
    return out


@pytest.mark.parametrize('factor,lo,hi', SETTINGS)
def test_parity_with_references_on_5000_sizes(factor, lo, hi):
    mismatches, refused_unjustified, accepted = [], [], 0
    for h, w in random_sizes(5000, seed=factor + hi):
        a, b = hf_smart_resize(h, w, factor, lo, hi), QVU(h, w, factor, lo, hi)
        try: ours = smart_resize(h, w, factor, lo, hi)
        except ResizeError:
            if a == b and min(a) >= factor and lo <= a[0] * a[1] <= hi and max(a) / min(a) <= MAX_RATIO:
                refused_unjustified.append((h, w))
            continue
        accepted += 1
        if ours != a or ours != b: mismatches.append((h, w, ours, a, b))
    assert mismatches == []
    assert refused_unjustified == []
    assert accepted > 4500  # the refusals: sides under ~14 px and extreme ratios


@settings(max_examples=2000, deadline=None)
@given(h=st.integers(1, 20000), w=st.integers(1, 20000), family=st.sampled_from(sorted(COORD_SPACE)))
def test_resized_size_is_a_fixed_point(h, w, family):
    spec = ResizeSpec.for_family(family)
    try: rh, rw = spec.resize(h, w)
    except ResizeError: return
    assert rh % spec.factor == 0 and rw % spec.factor == 0
    assert spec.min_pixels <= rh * rw <= spec.max_pixels
    assert spec.resize(rh, rw) == (rh, rw)  # converted images are not resized again by the processor
    assert hf_smart_resize(rh, rw, spec.factor, spec.min_pixels, spec.max_pixels) == (rh, rw)


@settings(max_examples=3000, deadline=None)
@given(ow=st.integers(28, 6000), oh=st.integers(28, 6000), family=st.sampled_from(sorted(COORD_SPACE)),
       fx=st.lists(st.floats(0, 1), min_size=2, max_size=2), fy=st.lists(st.floats(0, 1), min_size=2, max_size=2),
       max_pixels=st.sampled_from([200704, 1003520, 12845056]))
def test_box_round_trip_within_half_a_model_unit(ow, oh, family, fx, fy, max_pixels):
    spec = ResizeSpec.for_family(family, max_pixels=max_pixels)
    try: rh, rw = spec.resize(oh, ow)
    except ResizeError: return
    x1, x2 = sorted(v * ow for v in fx); y1, y2 = sorted(v * oh for v in fy)
    box = np.array([[x1, y1, x2, y2]])
    in_resized = scale_boxes(box, (ow, oh), (rw, rh))
    # float round trip through the resized image is exact
    assert np.allclose(scale_boxes(in_resized, (rw, rh), (ow, oh)), box, atol=1e-6)
    back = scale_boxes(boxes_from_model(boxes_to_model(in_resized, (rw, rh), family), (rw, rh), family), (rw, rh), (ow, oh))
    unit = np.array([ow, oh, ow, oh]) / (1000.0 if COORD_SPACE[family] == 'rel1000' else np.array([rw, rh, rw, rh]))
    assert np.all(np.abs(back - box) <= unit / 2 + 1e-6)
    if np.all(unit <= 2): assert np.abs(back - box).max() <= 1.0 + 1e-6   # "within one pixel" where it can hold
