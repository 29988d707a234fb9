"""Shared pieces of the reliability suite: the `case` marker, fuzz budgets, image builders, and the existing tests it cites.

Run as a script, it prints the node ids of the cited tests (the `reliability-report` make target runs them with the suite).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPORT_ENV = 'VLMLAB_RELIABILITY_REPORT'  # path of the JSON table; the suite writes it only when this is set
FUZZ_ENV = 'VLMLAB_FUZZ_EXAMPLES'         # hypothesis examples per fuzz test, over the CI defaults
RESULTS = ('passed', 'failed', 'xfailed', 'xpassed', 'skipped', 'error')


def case(name: str, # short case name, as shown in the table
         expected: str, # the behaviour the test asserts
         group: str | None = None, # table section (default: the test module's GROUP)
        ) -> pytest.MarkDecorator:
    "Mark a test (or a `pytest.param`) as one row of the reliability table."
    return pytest.mark.case(name, expected, group=group)


def fuzz_examples(default: int) -> int:
    "Examples for one hypothesis test: `default` in CI, `$VLMLAB_FUZZ_EXAMPLES` when set."
    return int(os.environ.get(FUZZ_ENV) or default)


def scene(path: Path, # where to save the image
          size: tuple[int, int] = (300, 200), # (width, height) as displayed
          box: tuple[int, int, int, int] = (40, 50, 120, 130), # red square, xyxy in displayed pixels
          orientation: int = 1, # EXIF orientation to store the image with (1-8)
          mode: str = 'RGB', # PIL mode to store (RGB, RGBA, P, ...)
          **save_kw,
         ) -> list[int]:
    "Save an image that *displays* as a grey canvas with a red square at `box`, stored with the given EXIF orientation."
    img = Image.new('RGB', size, (240, 240, 240))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(220, 30, 30))
    # the stored pixels are the displayed ones under the inverse of the orientation's transform
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}[orientation]
    stored = img.transpose(inverse) if inverse is not None else img
    if mode == 'P': stored = stored.convert('P', palette=Image.Palette.ADAPTIVE, colors=8)   # exact colours, no dithering
    elif mode != 'RGB': stored = stored.convert(mode)
    if orientation != 1:
        exif = Image.Exif(); exif[0x0112] = orientation; save_kw['exif'] = exif
    stored.save(path, **save_kw)
    return list(box)


def raw_sample(folder: Path, # raw annotation folder
               name: str, # sample name: writes {name}.json next to its image
               objects: list | None = None, # the objects (default: the red square of `scene`)
               image: Image.Image | None = None, # an image to save as {name}{ext} instead of `scene`'s
               ext: str = '.png', # image file extension
               **scene_kw,
              ) -> None:
    "Write one raw annotation sample: an image and its {'image', 'objects'} JSON."
    img_path = folder / f'{name}{ext}'
    if image is not None: image.save(img_path)
    else: scene(img_path, **scene_kw)
    objs = [{'bbox': list(scene_kw.get('box', (40, 50, 120, 130))), 'desc': 'red square'}] if objects is None else objects
    (folder / f'{name}.json').write_text(json.dumps({'image': img_path.name, 'objects': objs}))


def red_fraction(img: np.ndarray, box) -> float:
    "Fraction of clearly red pixels inside `box` (xyxy, shrunk by 2 px against resampling edges)."
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    patch = img[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3).astype(int)
    return float(((patch[:, 0] > 170) & (patch[:, 1] < 90)).mean()) if len(patch) else 0.0


# Existing tests (outside tests/reliability) that already cover a case: (node id, group, case, expected behaviour).
# The table lists them only when they ran in the same pytest session (`make reliability-report` runs them).
CITED = [
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'truncated JPEG',
     'rejected: "<file>: cannot decode image"; counts balance'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'missing image file',
     'rejected: "<file>: file not found"'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'CMYK and 16-bit greyscale images',
     'converted to RGB deterministically and noted in the summary'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'NaN box, swapped corners, box out of bounds',
     'rejected naming the sample, the object index and the problem'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'image smaller than one 28x28 cell',
     'rejected: "image 20x12 has a side under 28 px"'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'old-format (list) raw JSON without --migrate-old',
     'rejected: "old list-shaped raw JSON", with the clean-raw-json fix'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: conversion', 'malformed raw JSON',
     'rejected: "<file>: malformed JSON at line 1"'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: validation', 'records checked against another family',
     'validate names train.jsonl:<line> and "was converted with resize spec ..."'),
    ('tests/test_convert.py::test_ten_kinds_of_bad_input', 'Bad input: validation', 'same image in train and test',
     'validate reports the leak with both sample ids'),
    ('tests/test_convert.py::test_orientation_6_boxes_land_on_the_object', 'Bad input: conversion', 'EXIF orientation 6 (phone photo)',
     'boxes land on the object after the transpose; noted in the summary'),
    ('tests/test_convert.py::test_killed_conversion_never_looks_complete_and_rerun_matches', 'Faults', 'conversion SIGKILLed after random delays',
     'no partial JSONL or image is visible; a re-run gives byte-identical JSONL'),
    ('tests/test_convert.py::test_validate_refuses_paths_escaping_ds_output', 'Security', 'validate: ../, absolute path, symlink out',
     'each record is an error: "must be relative to ds_output/" / "resolves outside ds_output/"'),
    ('tests/test_trainer.py::test_resume_after_sigkill_reproduces_the_trajectory', 'Faults', 'training SIGKILLed, then --resume',
     'resumes from the last complete checkpoint; every logged loss term equals the uninterrupted run (1e-5)'),
    ('tests/test_trainer.py::test_incomplete_checkpoint_is_never_last', 'Faults', 'checkpoint half-written when killed',
     'never chosen as last_good_checkpoint (marker missing or a listed file truncated)'),
    ('tests/test_trainer.py::test_nan_input_stops_with_diagnosis_and_keeps_the_checkpoint', 'Faults', 'NaN injected into a batch',
     'NonFiniteError names step, samples and "pixel_values"; the last good checkpoint stays complete'),
    ('tests/test_trainer.py::test_nan_gradient_names_the_group', 'Faults', 'inf injected into a gradient (diagnosis)',
     'NonFiniteError names the module group and the parameter'),
    ('tests/test_trainer.py::test_cli_train_refuses_bad_setups_before_step_0', 'Faults', 'training output directory cannot be created',
     'vlmlab train exits 2 before loading the model: "output directory ...: cannot create it"'),
    ('tests/test_doctor_faults.py::test_write_errors_are_named_with_an_alternative', 'Faults', 'quota exceeded / disk full / read-only (doctor)',
     'the doctor names EDQUOT / ENOSPC / EROFS and a writable alternative'),
    ('tests/test_cli.py::test_doctor_fails_on_moved_special_token', 'Bad input: tokens', 'moved <|image_pad|> (vlmlab doctor)',
     'doctor fails naming the token, its id and config.image_token_id'),
    ('tests/test_configs.py::test_yaml_never_executes_code', 'Security', 'YAML config with !!python/object/apply',
     'ConfigError "not valid YAML" (yaml.safe_load); the command never runs'),
    ('tests/test_configs.py::test_errors_name_file_and_key', 'Bad input: configs', 'misspelt config key',
     'ConfigError names the file, the key and the closest allowed key'),
    ('tests/test_collators_properties.py::test_packed_invariants', 'Fuzz and properties', 'packed collation (500 batches)',
     'cu_seqlens, 4-row positions, boundary labels -100, pixel rows match the grids'),
    ('tests/test_collators_properties.py::test_standard_invariants', 'Fuzz and properties', 'padded collation (500 batches)',
     'attention mask counts, labels -100 on padding, shapes agree'),
    ('tests/test_collators_properties.py::test_plan_packs_is_a_partition_within_capacity', 'Fuzz and properties', 'packing plan (300 length lists)',
     'a partition of the samples, every row within capacity'),
    ('tests/test_vision_properties.py::test_box_round_trip_within_half_a_model_unit', 'Fuzz and properties', 'box transforms (3000 boxes)',
     'pixel -> resized -> model coordinates -> pixel within half a model unit'),
    ('tests/test_vision_properties.py::test_resized_size_is_a_fixed_point', 'Fuzz and properties', 'smart_resize (2000 sizes)',
     'a converted image is never resized again by the processor'),
    ('tests/test_packing_equivalence.py::test_labels_are_exactly_the_answers', 'Fuzz and properties', 'answer spans (60 conversations)',
     'labels are exactly the assistant answers; one student span per answer'),
    ('tests/test_detection_properties.py::test_parser_only_raises_its_own_error', 'Fuzz and properties', 'grounding parser (2000 texts)',
     'only GroundingParseError, never another exception'),
]


def cited_node_ids() -> list[str]:
    "The distinct node ids of the cited tests, in table order."
    return list(dict.fromkeys(n for n, *_ in CITED))


if __name__ == '__main__':
    print(' '.join(cited_node_ids()))
