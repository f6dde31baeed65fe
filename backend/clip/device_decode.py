"""JPEG decode and preprocessing on the model's device, batched on the model thread.

On a GPU the Pillow path (one JPEG decode per request thread, under the GIL) caps a process far below
what the model encodes. Here request threads only read the JPEG's header (the same size and bomb
checks as images.load_image) and hand the bytes to the model thread, which decodes a whole batch with
torchvision's decode_jpeg (nvJPEG on CUDA, libjpeg-turbo on the CPU), then does open_clip's eval
transform on tensors: EXIF orientation, shortest-side resize (antialiased bicubic), centre crop,
scale and normalise.

Anything unusual keeps the Pillow path, with its answers and errors: other formats, CMYK, progressive
or non-8-bit JPEGs, Adobe RGB-coded JPEGs, files not ending in an EOI marker (truncated), very long
strips, and any JPEG the device decoder refuses (the request thread then decodes it with Pillow).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from . import decode_bombs
from .errors import BadImage
from .images import MAX_ASPECT, sniff

if TYPE_CHECKING:
    from .model import ClipModel

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg still works.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

MODES = ("auto", "on", "off")
PIXELS_PER_DECODE = 64_000_000  # decoded pixels held at once on the device (3 bytes each)
ORIENTATION = 0x0112


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG whose header passed the checks: decoded on the model thread."""

    data: bytes
    width: int
    height: int
    orientation: int


@dataclass(frozen=True)
class Refused:
    """The feature row of a JPEG the device decoder could not decode: the caller decodes it with Pillow."""

    data: bytes


class Unsupported(Exception):
    """The model's transform is not one this module reproduces."""


def enabled(mode: str, device: torch.device) -> bool:
    if mode not in MODES:
        raise ValueError(f"CLIP_DEVICE_DECODE must be one of {', '.join(MODES)}, not {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class DeviceDecoder:
    def __init__(self, model: ClipModel):
        self.model = model
        self.device = model.device
        self.resize, self.interpolation, self.crop, mean, std = _read_transform(model.preprocess.transforms)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    # ---- request threads: header only, no torch ----

    def accept(self, data: bytes, max_pixels: int) -> DeviceJpeg | None:
        """read_header(): the device takes the JPEG, or None (the Pillow path)."""
        return read_header(data, max_pixels)

    # ---- the model thread ----

    @torch.inference_mode()
    def encode(self, items: list) -> torch.Tensor | list:
        """The batcher's encode: prepared arrays and DeviceJpegs in one forward pass; one row per item, a
        Refused in place of a JPEG the device could not decode."""
        jpegs = [i for i, item in enumerate(items) if isinstance(item, DeviceJpeg)]
        if not jpegs:
            return self.model.encode_prepared(items)
        decoded = self.preprocess([items[i] for i in jpegs])
        rows: list = [None] * len(items)
        order, parts = [], []
        arrays = [i for i, item in enumerate(items) if not isinstance(item, DeviceJpeg)]
        if arrays:
            parts.append(self.model.to_batch([items[i] for i in arrays]))
            order += arrays
        for i, tensor in zip(jpegs, decoded):
            if tensor is None:
                rows[i] = Refused(items[i].data)
            else:
                parts.append(tensor.unsqueeze(0))
                order.append(i)
        if parts:
            features = self.model.encode_images(torch.cat(parts))
            for i, row in zip(order, features):
                rows[i] = row
        return rows

    def preprocess(self, jobs: list[DeviceJpeg]) -> list[torch.Tensor | None]:
        """DeviceJpegs -> normalised CHW float tensors on the device (None where decoding failed)."""
        out: list[torch.Tensor | None] = []
        chunk: list[DeviceJpeg] = []
        pixels = 0
        for job in jobs:
            if chunk and pixels + job.width * job.height > PIXELS_PER_DECODE:
                out += self._preprocess_chunk(chunk)
                chunk, pixels = [], 0
            chunk.append(job)
            pixels += job.width * job.height
        if chunk:
            out += self._preprocess_chunk(chunk)
        return out

    def _preprocess_chunk(self, jobs: list[DeviceJpeg]) -> list[torch.Tensor | None]:
        """Pictures of one size and orientation (a camera's, a benchmark's) go through the resize together:
        a few kernel launches per group instead of per picture; the crops are normalised as one batch."""
        images = self._decode(jobs)
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, (job, image) in enumerate(zip(jobs, images)):
            if image is not None:
                groups.setdefault((tuple(image.shape), job.orientation), []).append(i)
        if not groups:
            return [None] * len(jobs)
        order, crops = [], []
        for (_, orientation), members in groups.items():
            stack = torch.stack([images[i] for i in members])  # type: ignore[misc]  # decoded ones only
            crops.append(self._resize_crop(stack, orientation))
            order += members
        batch = torch.cat(crops).round_().clamp_(0, 255)  # Pillow resizes to uint8: the same rounding
        batch = (batch - self.mean) / self.std
        out: list[torch.Tensor | None] = [None] * len(jobs)
        for i, row in zip(order, batch):
            out[i] = row
        return out

    def _decode(self, jobs: list[DeviceJpeg]) -> Sequence[torch.Tensor | None]:
        encoded = [torch.frombuffer(bytearray(job.data), dtype=torch.uint8) for job in jobs]
        try:  # one call: nvJPEG decodes the batch together
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the call: find it, decode the rest
            images: list[torch.Tensor | None] = []
            for data in encoded:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
            return images

    def _resize_crop(self, images: torch.Tensor, orientation: int) -> torch.Tensor:
        """uint8 NCHW of one size -> float NCHW crops, as open_clip's Resize/CenterCrop do (before rounding)."""
        images = orient(images, orientation).float()
        scale = draft_scale(images.shape[-1], images.shape[-2], self.model.image_size)
        if scale > 1:  # what Pillow's draft() does while decoding, as a box average of the same factor
            images = torch.nn.functional.avg_pool2d(images, scale, ceil_mode=True)
        images = F.resize(images, [self.resize], self.interpolation, antialias=True)
        return F.center_crop(images, [self.crop, self.crop])


def admit(data: bytes, limits: decode_bombs.Limits, max_pixels: int) -> DeviceJpeg | None:
    """A request thread's whole check of one picture for the device path: the decode-bomb checks (a
    BadImage image_too_complex), then read_header(). One segment walk serves both."""
    fmt = sniff(data)
    shape = decode_bombs.jpeg_shape(data, limits) if fmt == "JPEG" else None
    problem = decode_bombs.shape_problem(shape, limits) if shape else decode_bombs.problem(fmt, data, limits)
    if problem:  # before any header parse
        raise BadImage("image_too_complex", problem)
    return read_header(data, max_pixels, shape)


def read_header(data: bytes, max_pixels: int, shape: decode_bombs.JpegShape | None = None) -> DeviceJpeg | None:
    """A DeviceJpeg when the bytes are a plain baseline JPEG within the limits, else None (Pillow path:
    it gives every refusal, image_too_large included, in its own words). shape: the file's segment walk,
    when the caller has made it already."""
    if sniff(data) != "JPEG":
        return None
    if not decode_bombs.plain_single_scan(data, shape or decode_bombs.jpeg_shape(data, decode_bombs.Limits())):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        width, height = image.size
        info = image.info
        if (
            image.format != "JPEG"
            or image.mode not in ("RGB", "L")
            or getattr(image, "bits", 8) != 8
            or info.get("progressive")
            or info.get("progression")
            or (image.mode == "RGB" and "adobe" in info and info.get("adobe_transform") == 0)
            or not 1 <= width * height <= max_pixels
            or max(width, height) > MAX_ASPECT * min(width, height)
        ):
            return None
        orientation = image.getexif().get(ORIENTATION, 1)
    except Exception:  # a header Pillow cannot read: its own path says why
        return None
    if orientation not in range(1, 9):
        orientation = 1
    return DeviceJpeg(data, width, height, orientation)


def draft_scale(width: int, height: int, image_size: int) -> int:
    """The factor (1, 2, 4 or 8) by which images.load_image's JPEG draft() shrinks this picture while
    decoding: Pillow's own rule for draft("RGB", (image_size, image_size)), used from twice that size."""
    if min(width, height) < 2 * image_size:
        return 1
    fits = min(width // image_size, height // image_size)
    return 8 if fits >= 8 else 4 if fits >= 4 else 2


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """What ImageOps.exif_transpose does for EXIF orientation 1-8, on a CHW tensor."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def _read_transform(steps: Sequence[Any]) -> tuple[int, InterpolationMode, int, tuple[float, ...], tuple[float, ...]]:
    """(resize, interpolation, crop, mean, std) of an open_clip eval transform of the usual shape:
    Resize(shortest side) -> CenterCrop -> convert to RGB -> ToTensor -> Normalize."""
    names = [type(step).__name__ for step in steps]
    if names[:2] != ["Resize", "CenterCrop"] or names[-1] != "Normalize" or len(steps) > 5:
        raise Unsupported(f"transform {names}")
    resize, crop, normalize = steps[0], steps[1], steps[-1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    crop_h, crop_w = (crop.size, crop.size) if isinstance(crop.size, int) else tuple(crop.size)
    if (
        size is None
        or getattr(resize, "max_size", None)
        or crop_h != crop_w
        or resize.interpolation not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR)
    ):
        raise Unsupported(f"resize {resize}, crop {crop}")
    if len(normalize.mean) != 3 or any(math.isnan(v) for v in (*normalize.mean, *normalize.std)):
        raise Unsupported(f"normalize {normalize}")
    return size, resize.interpolation, crop_h, tuple(normalize.mean), tuple(normalize.std)
