"""Images that hang, blow up memory or decode wrong: non-regular files, decode cost, corrupt data, multi-frame files, and
EXIF orientation at every entry point that takes an image. Each case failed before `vlmlab.vision` checked it."""
from __future__ import annotations

import functools
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from reliability_kit import case, scene
from vlmlab import vision
from vlmlab.vision import ImageLoadError, ResizeSpec, load_image

nonregular_case = functools.partial(case, group='Images: non-regular files')
cost_case = functools.partial(case, group='Images: decode cost')
corrupt_case = functools.partial(case, group='Images: corrupt data')
frames_case = functools.partial(case, group='Images: frames')
orientation_case = functools.partial(case, group='Images: orientation')


def in_thread(fn, seconds: float = 5.0):
    "Run fn in a daemon thread: ('returned', value) / ('raised', exception) / ('blocked', None) after `seconds`."
    out = {}
    def run():
        try: out['v'] = ('returned', fn())
        except BaseException as e: out['v'] = ('raised', e)
    t = threading.Thread(target=run, daemon=True); t.start(); t.join(seconds)
    return out.get('v', ('blocked', None))


def release_fifo(path: Path) -> None:
    "Unblock a reader stuck in open() on a FIFO (open the writing end without blocking, then close it)."
    try: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError: pass


def photo(w: int = 640, h: int = 480, seed: int = 0) -> Image.Image:
    "A photo-like RGB image: smooth colour gradients with sensor noise."
    r = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, w)[None, :, None], np.linspace(0, 1, h)[:, None, None]
    a = 128 + 100 * np.sin(6 * x + 3 * y + np.array([0, 1, 2])) + r.normal(0, 20, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    try: img.save(buf, 'JPEG', **kw)
    except OSError:   # PIL cannot always combine optimize with its small buffer
        kw.pop('optimize', None); buf = io.BytesIO(); img.save(buf, 'JPEG', **kw)
    return buf.getvalue()


def scan_of(data: bytes) -> tuple[int, int]:
    "(start, end) of a baseline JPEG's entropy-coded data, found independently of vlmlab: after SOS up to the EOI."
    sos = data.index(b'\xff\xda'); start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], 'big')
    return start, data.rindex(b'\xff\xd9')


def png_bomb(path: Path, w: int, h: int, bits: int = 16, colour: int = 0) -> None:
    "A PNG of w x h zero pixels without any pixel buffer: a few hundred KB for 13000x13000 at 16 bits."
    chunk = lambda kind, body: struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    row = bytes(1 + w * (bits // 8) * {0: 1, 2: 3}[colour])
    block, n = row * 100, h // 100
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)        # after a full flush the same block compresses the same
    body = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.compress(row * (h - 100 * n)) + z.flush()
    adler = 1
    for _ in range(n): adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * (h - 100 * n), adler)
    idat = b'\x78\xda' + head + body * (n - 1) + tail + struct.pack('>I', adler)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, bits, colour, 0, 0, 0)) +
                     chunk(b'IDAT', idat) + chunk(b'IEND', b''))


# ---- non-regular files

@nonregular_case('image path is a FIFO', 'ImageLoadError "<path>: is a FIFO (named pipe), not a regular file" at once; never opened, never blocks')
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / 'cam.jpg'; os.mkfifo(fifo)
    try:
        for fn in (vision.load_image, vision.image_size):
            t0 = time.perf_counter()
            kind, v = in_thread(lambda: fn(fifo))
            assert kind == 'raised', f"{fn.__name__}(FIFO) {kind} (a FIFO must be refused, not opened)"
            assert isinstance(v, ImageLoadError) and str(fifo) in str(v) and 'FIFO' in str(v), repr(v)
            assert time.perf_counter() - t0 < 1.0
    finally: release_fifo(fifo)


@nonregular_case('FIFO among the inputs of convert', 'that sample is rejected naming the FIFO; the others convert; counts balance')
def test_convert_with_a_fifo_completes(tmp_path):
    from vlmlab.data import convert
    raw = tmp_path / 'raw'; raw.mkdir()
    scene(raw / 'good.png')
    (raw / 'good.json').write_text(json.dumps({'image': 'good.png', 'objects': [{'bbox': [40, 50, 120, 130], 'desc': 'red square'}]}))
    os.mkfifo(raw / 'pipe.png')
    (raw / 'pipe.json').write_text(json.dumps({'image': 'pipe.png', 'objects': [{'bbox': [40, 50, 120, 130], 'desc': 'red square'}]}))
    spec = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)
    try:
        kind, s = in_thread(lambda: convert(raw, tmp_path / 'out', spec, progress=False), seconds=60)
        assert kind == 'returned', f"convert {kind}: {s!r}"
        assert (s.inputs, s.written, s.rejected) == (2, 1, 1), str(s)
        rejects = (tmp_path / 'out' / 'train.rejects.jsonl').read_text()
        assert 'pipe.png' in rejects and 'FIFO' in rejects, rejects
    finally: release_fifo(raw / 'pipe.png')


@pytest.mark.parametrize('kind', [
    pytest.param('directory', marks=nonregular_case('image path is a directory', 'ImageLoadError "<path>: is a directory, not a regular file"')),
    pytest.param('device', marks=nonregular_case('image path is a character device (/dev/zero)',
                                                 'ImageLoadError "is a character device"; /dev/zero is never read')),
    pytest.param('socket', marks=nonregular_case('image path is a Unix socket', 'ImageLoadError "is a socket"')),
    pytest.param('symlink', marks=nonregular_case('image path is a symlink to a FIFO', 'the target is checked: ImageLoadError "is a FIFO"')),
])
def test_other_non_regular_files(tmp_path, kind):
    path, what = {'directory': (tmp_path / 'album.jpg', 'a directory'), 'device': (Path('/dev/zero'), 'a character device'),
                  'socket': (tmp_path / 'up.png', 'a socket'), 'symlink': (tmp_path / 'link.jpg', 'a FIFO')}[kind]
    sock = None
    if kind == 'directory': path.mkdir()
    if kind == 'socket': sock = socket.socket(socket.AF_UNIX); sock.bind(str(path))
    if kind == 'symlink': os.mkfifo(tmp_path / 'target'); path.symlink_to(tmp_path / 'target')
    try:
        for fn in (vision.load_image, vision.image_size):
            res, v = in_thread(lambda: fn(path), seconds=3)
            assert res == 'raised' and isinstance(v, ImageLoadError), f"{fn.__name__}({kind}) {res}: {v!r}"
            assert str(path) in str(v) and what in str(v), str(v)
    finally:
        if sock: sock.close()
        if kind == 'symlink': release_fifo(tmp_path / 'target')


# ---- decode cost

CHILD = r'''
import json, os, resource, sys, time
from vlmlab.vision import load_image, ImageLoadError
vm = int(open('/proc/self/statm').read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))   # 1 GiB more than the imports took: the bomb cannot fit
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try: load_image(sys.argv[1]); out = 'decoded'
except ImageLoadError as e: out = 'refused: ' + str(e)
except MemoryError: out = 'MemoryError'
print(json.dumps({'out': out, 'seconds': time.perf_counter() - t0, 'extra_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
'''


@pytest.fixture(scope='module')
def bomb(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp('bomb') / 'bomb16.png'
    png_bomb(p, 13000, 13000)
    return p


@cost_case('13000x13000 16-bit PNG of a few hundred KB', 'refused from the header, naming the size and max_decode_pixels; '
           'the refusal costs < 20 MB peak RSS and < 1 s')
def test_png_bomb_is_refused_before_decoding(bomb):
    assert bomb.stat().st_size < 1_000_000
    r = subprocess.run([sys.executable, '-c', CHILD, str(bomb)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['out'].startswith('refused: '), res
    assert '13000x13000' in res['out'] and 'max_decode_pixels' in res['out'] and bomb.name in res['out'], res['out']
    assert res['extra_mb'] < 20 and res['seconds'] < 1.0, res
    tracemalloc.start()
    with pytest.raises(ImageLoadError): vision.image_size(bomb)
    assert tracemalloc.get_traced_memory()[1] < 2_000_000
    tracemalloc.stop()


@cost_case('camera photos 6000x4000 and 8000x6000, 100 MP medium format', 'accepted by every family\'s default cap; the cap '
           'is 8 x the family\'s released max_pixels and is configurable (None, or any number)')
def test_camera_photos_pass_and_the_cap_is_configurable(tmp_path):
    for w, h in ((6000, 4000), (8000, 6000), (11648, 8736)):
        png_bomb(tmp_path / f'{w}.png', w, h, bits=8, colour=2)
        for fam in ('qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'):
            spec = ResizeSpec.for_family(fam, max_pixels=200704)   # a small training max_pixels must not shrink the cap
            assert vision.image_info(tmp_path / f'{w}.png', spec.max_decode_pixels).size == (w, h)
    for fam in ('qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'):
        spec = ResizeSpec.for_family(fam)
        assert spec.max_decode_pixels == vision.DECODE_PIXELS_FACTOR * vision.RELEASED_PIXELS[fam][1] < 13000 * 13000
    Image.new('RGB', (6000, 4000), (90, 140, 200)).save(tmp_path / 'cam.jpg', quality=85)
    assert load_image(tmp_path / 'cam.jpg').size == (6000, 4000)
    photo(640, 480).save(tmp_path / 'small.png')
    with pytest.raises(ImageLoadError, match=r"640x480 RGB PNG .* past max_decode_pixels=100,000"):
        load_image(tmp_path / 'small.png', max_decode_pixels=100_000)
    assert load_image(tmp_path / 'small.png', max_decode_pixels=None).size == (640, 480)


@cost_case('decode cap on a PIL image handed to an entry point', 'as_image refuses it from its size before decoding')
def test_as_image_checks_the_cap_of_an_opened_image(bomb):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)   # PIL only warns at 169 M pixels
        im = Image.open(bomb)
    with im, pytest.raises(ImageLoadError, match='13000x13000 I;16 PNG .* past max_decode_pixels'):
        vision.as_image(im)


@cost_case('progressive JPEG with 600 scans', 'refused before decoding: "JPEG with more than 500 scans"; '
           'a normal progressive file (about 10 scans) decodes')
def test_jpeg_with_many_scans_is_refused(tmp_path):
    data = jpeg_bytes(photo(64, 48), quality=80, progressive=True)
    scans = [k for k in range(len(data) - 1) if data[k:k + 2] == b'\xff\xda']
    assert 5 <= len(scans) <= 20
    last = data[scans[-1]:data.rindex(b'\xff\xd9')]            # the last scan: its header and its data
    (tmp_path / 'normal.jpg').write_bytes(data)
    assert load_image(tmp_path / 'normal.jpg').size == (64, 48)
    (tmp_path / 'scans.jpg').write_bytes(data[:scans[-1]] + last * (601 - len(scans)) + data[scans[-1]:])
    with pytest.raises(ImageLoadError, match=r"scans\.jpg: cannot decode image: JPEG with more than 500 scans"):
        load_image(tmp_path / 'scans.jpg')


# ---- corrupt data

@pytest.fixture(scope='module')
def base_jpeg() -> bytes:
    return jpeg_bytes(photo(640, 480, 1), quality=90)


def refused(data: bytes, tmp_path: Path, name: str = 'x.jpg') -> str | None:
    "The ImageLoadError message, or None when vlmlab accepts the file."
    p = tmp_path / name; p.write_bytes(data)
    try: load_image(p); return None
    except ImageLoadError as e:
        assert str(p) in str(e); return str(e)


@pytest.mark.parametrize('cut', [0.3, 0.6, 0.95])
@corrupt_case('JPEG cut inside its scan, an end marker appended', 'refused: "corrupt or cut JPEG scan data" (PIL fills the rest and accepts it)')
def test_cut_jpeg_with_eoi_is_refused(base_jpeg, tmp_path, cut):
    s, e = scan_of(base_jpeg)
    data = base_jpeg[:s + int((e - s) * cut)] + b'\xff\xd9'
    Image.open(io.BytesIO(data)).load()   # the naive loader accepts it
    assert 'JPEG scan data' in (refused(data, tmp_path) or 'accepted')


@corrupt_case('JPEG cut, with LOAD_TRUNCATED_IMAGES=True set by the caller', 'still refused: vlmlab decodes with it off')
def test_truncated_jpeg_is_refused_whatever_pil_is_told(base_jpeg, tmp_path):
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        msg = refused(base_jpeg[:len(base_jpeg) // 2], tmp_path)
        assert msg and 'truncated' in msg, msg
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True   # the caller's setting is restored
    finally: ImageFile.LOAD_TRUNCATED_IMAGES = old


@pytest.mark.parametrize('kind, share', [
    pytest.param('random32', 0.8, marks=corrupt_case('32 random bytes written into the JPEG scan (40 positions)',
                                                      'refused in at least 80% (35 of 40); the rest fall back into step; PIL accepts them all')),
    pytest.param('removed', 0.6, marks=corrupt_case('1-500 bytes cut out of the JPEG scan (40 positions)',
                                                     'refused in at least 60% (29 of 40); PIL accepts them all')),
    pytest.param('inverted', 0.35, marks=corrupt_case('one byte inverted in the JPEG scan (40 positions)',
                                                      'refused where the decoder falls out of step (at least 35%; 19 of 40); the rest change a '
                                                      'block or resynchronise, which no decoder can tell from valid data (on the page)')),
])
def test_corrupt_scans_are_refused(base_jpeg, tmp_path, kind, share):
    s, e = scan_of(base_jpeg)
    n_refused = n_naive_accepted = 0
    for k in range(40):
        r = np.random.default_rng(100 + k)
        pos = int(r.integers(s, e - 40))
        d = bytearray(base_jpeg)
        if kind == 'random32': d[pos:pos + 32] = bytes(int(v) for v in r.integers(0, 255, 32))
        elif kind == 'removed': del d[pos:pos + int(r.integers(1, 500))]
        else: d[pos] ^= 0xFF
        d = bytes(d)
        try: Image.open(io.BytesIO(d)).load(); n_naive_accepted += 1
        except OSError: pass
        n_refused += refused(d, tmp_path) is not None
    assert n_refused >= share * 40, f"{kind}: {n_refused}/40 refused (PIL accepted {n_naive_accepted}/40)"


@corrupt_case('valid JPEGs of every kind (100 files)', 'none refused: sizes 8-900 px, quality 30-99, subsampling, restart markers, '
              'progressive, greyscale, flat grey 128, optimized tables')
def test_valid_jpegs_are_never_refused(tmp_path):
    wrong = []
    for seed in range(100):
        r = np.random.default_rng(seed)
        w, h = int(r.integers(8, 900)), int(r.integers(8, 900))
        img = photo(w, h, seed)
        if seed % 3 == 1: img = img.convert('L')
        if seed % 7 == 0: img = Image.new(img.mode, img.size, 128 if img.mode == 'L' else (128, 128, 128))
        kw = dict(quality=int(r.integers(30, 100)), subsampling=int(r.integers(0, 3)))
        if seed % 4 == 0: kw['restart_marker_blocks'] = int(r.integers(1, 5))
        if seed % 5 == 0: kw['progressive'] = True
        if seed % 6 == 0: kw['optimize'] = True
        data = jpeg_bytes(img, **kw)
        msg = refused(data, tmp_path)
        if msg: wrong.append((seed, kw, msg))
        else:
            ref = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
            assert np.array_equal(np.asarray(load_image(tmp_path / 'x.jpg')), ref), seed   # the same pixels as PIL
    assert not wrong, wrong


@pytest.mark.parametrize('kind', [
    pytest.param('flip', marks=corrupt_case('PNG with a byte changed in its pixel data (PIL decodes it, mean error ~190)',
                                            'refused: "corrupt PNG: chunk \'IDAT\' ... fails its CRC"')),
    pytest.param('cut', marks=corrupt_case('PNG cut in its pixel data', 'refused: truncated')),
    pytest.param('cut_iend', marks=corrupt_case('PNG cut, IEND appended', 'refused')),
])
def test_corrupt_png_is_refused(tmp_path, kind):
    img = Image.new('RGB', (640, 480), (200, 200, 200))
    img.paste(photo(200, 100), (100, 100))
    buf = io.BytesIO(); img.save(buf, 'PNG'); data = buf.getvalue()
    i = data.index(b'IDAT'); n = int.from_bytes(data[i - 4:i], 'big')
    pos = i + 4 + (133 if kind == 'flip' else n // 2)   # 133: a byte whose change zlib does not notice
    d = {'flip': data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:], 'cut': data[:pos],
         'cut_iend': data[:pos] + data[-12:]}[kind]
    if kind == 'flip': Image.open(io.BytesIO(d)).load()   # the naive loader accepts it
    msg = refused(d, tmp_path, 'x.png')
    assert msg and ('CRC' in msg if kind == 'flip' else 'cannot decode image' in msg), msg


# ---- frames

def frames_of(kind: str, path: Path) -> list[Image.Image]:
    frames = [Image.new('RGB', (64, 48), c) for c in ((220, 30, 30), (30, 220, 30), (30, 30, 220))]
    opts = {'gif': dict(format='GIF'), 'webp': dict(format='WEBP', lossless=True), 'tiff': dict(format='TIFF'),
            'apng': dict(format='PNG')}[kind]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **opts)
    return frames


@pytest.mark.parametrize('kind', [
    pytest.param(k, marks=frames_case(f'{name} with 3 frames', 'frame 0 used, frame count in ImageInfo.frames and a note '
                                                               '"... with 3 frames: frame 0 used" for the record'))
    for k, name in (('gif', 'animated GIF'), ('webp', 'animated WebP'), ('tiff', 'multi-page TIFF'), ('apng', 'APNG'))])
def test_multi_frame_files_use_frame_0_and_say_so(tmp_path, kind):
    p = tmp_path / f'anim.{kind}'
    frames = frames_of(kind, p)
    img, info = vision.read_image(p)
    assert info.frames == 3, info
    assert any('3 frames: frame 0 used' in n for n in info.notes), info.notes
    assert vision.image_info(p).frames == 3
    assert np.abs(np.asarray(img, dtype=int) - np.asarray(frames[0], dtype=int)).max() <= 2   # frame 0 (GIF palette: exact)


# ---- orientation

@pytest.mark.parametrize('orientation', [2, 3, 4, 5, 6, 7, 8])
@orientation_case('PIL image with an EXIF orientation tag, orientations 2-8', 'as_image(Image.open(p)), as_image(decoded image) '
                  'and as_image(p) give the pixels load_image gives; an already transposed image is left alone')
def test_as_image_applies_the_orientation_like_load_image(tmp_path, orientation):
    p = tmp_path / f'o{orientation}.jpg'
    box = scene(p, orientation=orientation, quality=95)
    want = np.asarray(load_image(p))
    with Image.open(p) as im:
        assert np.array_equal(np.asarray(vision.as_image(im)), want)
    with Image.open(p) as im:
        im.load(); decoded = im.copy()
    assert decoded.getexif().get(0x0112) == orientation
    assert np.array_equal(np.asarray(vision.as_image(decoded)), want)
    assert np.array_equal(np.asarray(vision.as_image(p)), want) and np.array_equal(np.asarray(vision.as_image(str(p))), want)
    done = ImageOps.exif_transpose(Image.open(p))   # transposed already: PIL removed the tag, nothing more to do
    assert np.array_equal(np.asarray(vision.as_image(done)), want)
    assert want.shape[:2] == (200, 300) and want[box[1] + 5, box[0] + 5, 0] > 170


@pytest.fixture(scope='module')
def tiny_detector():
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from vlmlab.detection import DetectionHead, VLMDetector
    from vlmlab.tiny import tiny_kit
    from vlmlab.tokens import OBJECT_REF_END, OBJECT_REF_START
    torch.manual_seed(0)
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit('qwen2_5_vl')), AutoImageProcessor.from_pretrained(tiny_kit('qwen2_5_vl'))
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit('qwen2_5_vl'))
    head = DetectionHead(vlm.config.text_config.hidden_size, len(tok), tok.convert_tokens_to_ids(OBJECT_REF_START),
                         tok.convert_tokens_to_ids(OBJECT_REF_END), d_model=32, num_queries=4)
    return VLMDetector(vlm, head, tok, ip, 'qwen2_5_vl', lm_weight=0.0).eval()


@orientation_case('detect() on Image.open(phone photo with EXIF 6)', 'the same boxes as detect() on the path and on load_image(path), '
                  'in the displayed 300x200 frame')
def test_detect_applies_exif_to_pil_images(tmp_path, tiny_detector):
    from vlmlab.inference import detect, prompt_inputs
    p = tmp_path / 'phone.jpg'
    scene(p, orientation=6, quality=95)
    runs = {'path': detect(tiny_detector, p, threshold=0.0),
            'Image.open': detect(tiny_detector, Image.open(p), threshold=0.0),
            'load_image': detect(tiny_detector, load_image(p), threshold=0.0)}
    ref = np.array([d['bbox'] for d in runs['load_image']])
    assert len(ref) == 4
    for name, dets in runs.items():
        np.testing.assert_allclose(np.array([d['bbox'] for d in dets]), ref, atol=1e-4, err_msg=name)
    grid = prompt_inputs(tiny_detector, Image.open(p), 'where?')['image_grid_thw'][0].tolist()
    assert grid == prompt_inputs(tiny_detector, load_image(p), 'where?')['image_grid_thw'][0].tolist()
    assert grid[2] > grid[1]   # wider than tall: the displayed 300x200, not the stored 200x300
