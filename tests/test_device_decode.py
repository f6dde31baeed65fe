"""CLIP_DEVICE_DECODE=on: JPEGs decoded by torchvision and preprocessed as tensors on the model's device,
against the Pillow path of the same function. Runs on the CPU here (torchvision's decoder and resize
kernels run there too); scripts/gpu-check runs it on a GPU with CLIP_TEST_DEVICE=cuda (nvJPEG)."""
import io
import math
import os

import numpy as np
import pytest
import requests
import torch
from hypothesis import event, given
from PIL import Image, ImageOps
from support.images import image_bytes, noise_image
from support.servers import FunctionProcess
from test_fuzz import fuzz
from test_fuzz import image_bytes as fuzzed_images
from test_hostile_input import HOSTILE, UNUSUAL, encode, picture

from benchmarks.pictures import jpeg, photo  # the bench images

DEVICE = os.environ.get("CLIP_TEST_DEVICE", "cpu")
MAX_DELTA = 0.01  # largest |Δp| allowed between the two paths, per label
PHOTOS = {f"{w}x{h}": (w, h) for w, h in [(640, 480), (224, 224), (1024, 768), (300, 1000), (4000, 3000),
                                          (97, 131), (1920, 1080)]}
WORST = {}


def server(clip_env, tmp_path_factory, mode):
    env = {**clip_env, "CLIP_DEVICE_DECODE": mode, "CLIP_DEVICE": DEVICE}
    return FunctionProcess("clip", tmp_path_factory.mktemp(f"clip-decode-{mode}"), env)


@pytest.fixture(scope="module")
def device_server(clip_env, tmp_path_factory):
    with server(clip_env, tmp_path_factory, "on") as fn:
        yield fn


@pytest.fixture(scope="module")
def pillow_server(clip_env, tmp_path_factory):
    with server(clip_env, tmp_path_factory, "off") as fn:
        yield fn


def post(fn, data, **kwargs):
    return requests.post(fn.url, data=data, params={"top_k": 100}, timeout=60, **kwargs)


def scores(answer):
    return {row["label"]: row["score"] for row in answer["predictions"]}


def compare(device_answer, pillow_answer):
    """(same top-1, largest |Δp| over all labels)."""
    a, b = scores(device_answer), scores(pillow_answer)
    return (device_answer["predictions"][0]["label"] == pillow_answer["predictions"][0]["label"],
            max(abs(a[k] - b[k]) for k in a))


def test_the_description_says_which_path_decodes(device_server, pillow_server):
    assert requests.get(device_server.url, timeout=10).json()["device_decode"] is True
    assert requests.get(pillow_server.url, timeout=10).json()["device_decode"] is False


@pytest.mark.parametrize("name", list(PHOTOS))
def test_photos_get_the_pillow_answer(device_server, pillow_server, name):
    data = jpeg(photo(*PHOTOS[name], seed=len(name)))
    device, pillow = post(device_server, data), post(pillow_server, data)
    assert device.status_code == pillow.status_code == 200, device.text[:300]
    same_top1, delta = compare(device.json(), pillow.json())
    WORST[name] = delta
    print(f"\n{DEVICE} decode vs Pillow, {name}: same top-1 {same_top1}, max |Δp| {delta:.5f}")
    assert same_top1 and delta <= MAX_DELTA


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gets_the_pillow_answer(device_server, pillow_server, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(picture(size=(192, 128), seed=9), "JPEG", quality=95, exif=exif.tobytes())
    device, pillow = post(device_server, data), post(pillow_server, data)
    same_top1, delta = compare(device.json(), pillow.json())
    assert same_top1 and delta <= MAX_DELTA


FALLBACK = {"CMYK JPEG": UNUSUAL["CMYK JPEG"], "progressive JPEG": UNUSUAL["progressive JPEG"],
            "PNG": lambda: noise_image("PNG", size=(160, 120), seed=5), "WebP": UNUSUAL["WebP lossy"],
            "1x3000 JPEG": lambda: noise_image("JPEG", size=(1, 3000))}


@pytest.mark.parametrize("name", list(FALLBACK))
def test_what_the_device_does_not_decode_gets_exactly_the_pillow_answer(device_server, pillow_server, name):
    data = FALLBACK[name]()
    device, pillow = post(device_server, data), post(pillow_server, data)
    assert device.status_code == pillow.status_code == 200
    assert compare(device.json(), pillow.json())[1] < 1e-6


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_get_the_same_json_error(device_server, pillow_server, name):
    device, pillow = post(device_server, HOSTILE[name]), post(pillow_server, HOSTILE[name])
    assert 400 <= device.status_code < 500, device.text[:300]
    assert (device.status_code, device.json()["error"]["code"]) == (pillow.status_code, pillow.json()["error"]["code"])


def test_a_batch_mixing_paths_answers_item_by_item_like_pillow(device_server, pillow_server):
    images = [jpeg(photo(640, 480, seed=1)), UNUSUAL["CMYK JPEG"](), HOSTILE["corrupt JPEG data (random scan)"],
              with_undefined_quantisation_table(jpeg(photo(320, 240))),
              noise_image("PNG", seed=2), jpeg(photo(800, 600, seed=3)), HOSTILE["truncated JPEG"]]
    files = [("image", (f"{i}.bin", data)) for i, data in enumerate(images)]
    device = requests.post(device_server.url, files=files, params={"top_k": 100}, timeout=60)
    pillow = requests.post(pillow_server.url, files=files, params={"top_k": 100}, timeout=60)
    assert device.status_code == pillow.status_code == 200
    for got, expected in zip(device.json()["results"], pillow.json()["results"], strict=True):
        if "error" in expected:
            assert got["error"]["code"] == expected["error"]["code"]
        else:
            same_top1, delta = compare(got, expected)
            assert same_top1 and delta <= MAX_DELTA


def test_after_hostile_input_the_device_path_still_serves(device_server):
    for name in ("corrupt JPEG data (random scan)", "truncated JPEG", "JPEG header alone"):
        post(device_server, HOSTILE[name])
    assert post(device_server, jpeg(photo(640, 480))).status_code == 200


# ---- the decoder module itself, in this process ----------------------------------------------------

@pytest.fixture(scope="module")
def decoder(tiny_model):
    from clip import model as model_module
    from clip.device_decode import DeviceDecoder
    return DeviceDecoder(model_module.create(f"local-dir:{tiny_model}", "none", device=DEVICE))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_exif_transpose_pixel_for_pixel(orientation):
    from clip.device_decode import orient
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 9, 3), dtype=np.uint8))
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = orient(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("size", [(448, 448), (447, 900), (640, 480), (1024, 768), (4000, 3000), (3584, 1800),
                                  (5000, 460)])
def test_the_device_shrinks_by_the_factor_pillows_draft_uses(size):
    from clip.device_decode import draft_scale
    image = Image.open(io.BytesIO(image_bytes("JPEG", size=size)))
    if min(size) >= 2 * 224:  # images.load_image's rule
        image.draft("RGB", (224, 224))
    scale = draft_scale(*size, 224)
    assert image.size == tuple(math.ceil(side / scale) for side in size)


ROUTES = {
    "baseline RGB JPEG": (lambda: jpeg(photo(320, 240)), True),
    "grayscale JPEG": (UNUSUAL["grayscale JPEG"], True),
    "CMYK JPEG": (UNUSUAL["CMYK JPEG"], False),
    "progressive JPEG": (UNUSUAL["progressive JPEG"], False),
    "PNG": (lambda: image_bytes("PNG"), False),
    "truncated JPEG": (lambda: HOSTILE["truncated JPEG"], False),
    "stray marker in the scan": (lambda: HOSTILE["corrupt JPEG data (random scan)"], False),
    "bytes after the end-of-image marker": (lambda: jpeg(photo(320, 240)) + b"\0" * 64 + b"\xff\xd9", False),
    "JPEG over the pixel limit": (lambda: noise_image("JPEG", size=(1200, 1000)), False),
    "strip wider than 4:1": (lambda: noise_image("JPEG", size=(500, 100)), False),
}


@pytest.mark.parametrize("name", list(ROUTES))
def test_only_plain_jpegs_within_the_limits_go_to_the_device(decoder, name):
    make, expected = ROUTES[name]
    assert (decoder.accept(make(), max_pixels=1_000_000) is not None) == expected


def with_undefined_quantisation_table(data):
    """A well-formed file whose first component names quantisation table 3, which no DQT defines: the
    header reads fine, every decoder refuses the picture."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 12] + b"\x03" + data[sof + 13:]


def test_a_jpeg_the_device_refuses_fails_alone_in_its_batch(decoder):
    from clip.device_decode import Refused
    good = jpeg(photo(320, 240))
    bad = with_undefined_quantisation_table(good)
    jobs = [decoder.accept(data, 10**8) for data in (good, bad, good)]
    assert all(jobs)
    rows = decoder.encode(jobs)
    assert not isinstance(rows[0], Refused) and not isinstance(rows[2], Refused)
    assert torch.allclose(rows[0], rows[2], atol=1e-5)
    assert isinstance(rows[1], Refused) and rows[1].data == bad


@pytest.fixture(scope="module")
def two_services(tiny_model, clip_env):
    from support.inprocess import service
    return {mode: service(tiny_model, clip_env["CLIP_CACHE_DIR"], device_decode=mode, device=DEVICE)
            for mode in ("on", "off")}


@fuzz(120)
@given(fuzzed_images)
def test_fuzzed_images_get_the_pillow_status(two_services, data):
    from clip import handler
    from support.inprocess import Event
    previous, statuses = handler.SERVICE, {}
    try:
        for mode, svc in two_services.items():
            handler.SERVICE = svc
            answer = handler.handle(Event(data, "application/octet-stream"), None)
            statuses[mode] = (answer["statusCode"], answer["body"].get("error", {}).get("code"))
    finally:
        handler.SERVICE = previous
    event(f"{statuses['on']}")
    assert statuses["on"] == statuses["off"]


def test_pictures_of_one_size_resized_together_match_one_at_a_time(decoder):
    rotated = Image.open(io.BytesIO(jpeg(photo(640, 480, seed=4))))
    exif = rotated.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", exif=exif)
    pictures = [jpeg(photo(640, 480, seed=1)), jpeg(photo(320, 240, seed=2)), buffer.getvalue(),
                jpeg(photo(640, 480, seed=3)), with_undefined_quantisation_table(jpeg(photo(640, 480, seed=5)))]
    jobs = [decoder.accept(data, 10**8) for data in pictures]
    together = decoder.preprocess(jobs)
    for job, row in zip(jobs, together):
        alone = decoder.preprocess([job])[0]
        assert (row is None) == (alone is None)
        if row is not None:
            assert torch.allclose(row, alone, atol=1e-4)
    assert together[-1] is None and not torch.allclose(together[0], together[3])
