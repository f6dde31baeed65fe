"""The CLIP model: created once per process through open_clip's own factory, then only encodes."""

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch
from open_clip.factory import parse_model_name
from torchvision.transforms import Compose

from . import precision

if TYPE_CHECKING:
    from PIL import Image

LOG = logging.getLogger("model")
RANDOM_SEED = 0  # CLIP_PRETRAINED=none: same random weights every start, so caches stay valid


class WeightsUnavailable(RuntimeError):
    """The weights can be neither found nor downloaded: a setup problem with a known way out. Its message
    goes into answers and names no server path; `weights_dir` is for the operator's log."""

    def __init__(self, message: str, weights_dir: str | None = None):
        super().__init__(message)
        self.weights_dir = weights_dir


@dataclass
class ClipModel:
    model: torch.nn.Module
    preprocess: Compose  # open_clip's eval transform: PIL image -> normalised CHW float tensor
    tokenizer: Callable[[list[str]], torch.Tensor]  # texts -> token ids
    device: torch.device
    dtype: torch.dtype
    name: str
    pretrained: str
    untrained: bool
    weights_id: str  # identifies the weights, for cache keys
    image_size: int
    logit_scale: float
    dtype_setting: str = "fp32"  # CLIP_DTYPE as given
    dtype_reason: str = ""  # why this dtype (GET /, logs, scripts/bench)

    def __post_init__(self) -> None:
        # Split open_clip's transform at ToTensor: the PIL half (resize, crop, mode) runs in request
        # threads, which must never start torch's OpenMP pool (a second pool throttles the model's
        # threads: ~35 % slower forward passes); the tensor half runs batched on the model thread.
        steps = list(self.preprocess.transforms)
        cut = next(i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor"))
        self._pil_steps = steps[:cut]
        tail = steps[cut + 1 :]
        if len(tail) == 1 and type(tail[0]).__name__ == "Normalize":
            self._mean = torch.tensor(tail[0].mean, device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor(tail[0].std, device=self.device).view(1, -1, 1, 1)
            self._tensor_steps = None
        else:  # an unusual transform: apply its tensor half image by image, still on the model thread
            self._tensor_steps = steps[cut:]

    def prepare(self, image: "Image.Image") -> np.ndarray:
        """PIL image -> HWC uint8 array, ready for encode_prepared (no torch compute: any thread)."""
        image = _compose(self._pil_steps, image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))

    def to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """What ToTensor + Normalize do, for a whole batch at once (the same arithmetic, bit for bit)."""
        if self._tensor_steps is not None:
            return torch.stack([_compose(self._tensor_steps, a) for a in arrays])
        batch = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)  # uint8: 4× less to copy
        batch = batch.permute(0, 3, 1, 2).contiguous().float().div(255)
        return batch.sub_(self._mean).div_(self._std)

    @torch.inference_mode()
    def encode_prepared(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        return self.encode_images(self.to_batch(arrays))

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> L2-normalised float32 features on the CPU."""
        # open_clip's models are untyped: to mypy a Module's attribute is a Tensor or a Module, not a method
        features = self.model.encode_image(  # type: ignore[operator]
            batch.to(self.device, self.dtype, non_blocking=True),
        )
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Iterable[str]) -> torch.Tensor:
        return self._encode_tokens(self.tokenizer(list(texts)))

    @torch.inference_mode()
    def embed_texts(self, texts: Iterable[str]) -> tuple[np.ndarray, int]:
        """Texts -> their L2-normalised float32 embeddings (encode_text of each text itself, no prompt) and
        the tokens the model read (start and end included, past its context length cut)."""
        tokens = self.tokenizer(list(texts))
        return self._encode_tokens(tokens).numpy(), int((tokens != self._pad).sum())

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_text(tokens.to(self.device))  # type: ignore[operator]
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @property
    def _pad(self) -> int:
        """The padding token: 0 for open_clip's own tokenizer, the Hugging Face tokenizer's otherwise."""
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "dtype_setting": self.dtype_setting,
            "dtype_reason": self.dtype_reason,
            "untrained": self.untrained,
            "image_size": self.image_size,
        }


def _compose(steps: Iterable[Callable[[Any], Any]], value: Any) -> Any:
    for step in steps:
        value = step(value)
    return value


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CLIP_DEVICE=cuda but no CUDA device is visible")
    return torch.device(setting)


def _file_id(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def weights_id(name: str, pretrained: str) -> str:
    """A cheap identity for the weights: label-embedding caches are keyed by it."""
    schema, folder = parse_model_name(name)
    if schema == "local-dir":
        files = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".safetensors", ".bin", ".pth")))
        return "local-dir:" + ";".join(_file_id(os.path.join(folder, f)) for f in files)
    if pretrained.lower() == "none":
        return f"{name}:random-seed-{RANDOM_SEED}"
    if os.path.isfile(pretrained):
        return f"{name}:{_file_id(pretrained)}"
    return f"{name}:{pretrained}"


def create(
    name: str,
    pretrained: str,
    device: str = "auto",
    cache_dir: str | None = None,
    threads: int = 0,
    dtype: str = "auto",
) -> ClipModel:
    """One factory: open_clip name + tag, `local-dir:`, `hf-hub:`, a checkpoint path, or `none`;
    dtype: CLIP_DTYPE (auto|fp32|bf16|fp16, see precision.py)."""
    if threads > 0:
        torch.set_num_threads(threads)
    schema, _ = parse_model_name(name)  # local-dir: and hf-hub: bring their own weights
    untrained = _untrained(name, pretrained)
    if untrained:
        torch.manual_seed(RANDOM_SEED)
    model, preprocess = _load(name, None if untrained or schema else pretrained, pretrained, cache_dir)
    dev = pick_device(device)
    chosen = precision.choose(dtype, dev.type, cuda_bf16=dev.type != "cuda" or torch.cuda.is_bf16_supported())
    LOG.info("dtype %s: %s", chosen.name, chosen.reason)
    # before rounding to bf16/fp16 (open_clip's models are untyped: see encode_images)
    logit_scale = float(model.logit_scale.detach().float().exp().item())  # type: ignore[operator]
    model = model.to(dev, chosen.dtype)
    crop = next(t.size for t in preprocess.transforms if hasattr(t, "size"))  # the model's input size
    image_size = crop[0] if isinstance(crop, (tuple, list)) else int(crop)
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=dev,
        dtype=chosen.dtype,
        name=_display_name(name),
        pretrained=_display_pretrained(name, pretrained),
        untrained=untrained,
        weights_id=weights_id(name, pretrained),
        image_size=image_size,
        logit_scale=logit_scale,
        dtype_setting=chosen.setting,
        dtype_reason=chosen.reason,
    )


def _load(name: str, tag: str | None, pretrained: str, cache_dir: str | None) -> tuple[torch.nn.Module, Compose]:
    """open_clip's model (in eval mode) and eval transform; tag None: the schema's own weights, or
    random ones (CLIP_PRETRAINED=none)."""
    weights_dir = os.path.join(cache_dir, "weights") if cache_dir else None
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(_quiet_download_error)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, cache_dir=weights_dir)
    except RuntimeError as exc:
        if "download" not in str(exc).lower():
            raise
        raise WeightsUnavailable(
            f"The weights of {_display_name(name)} ({_display_pretrained(name, pretrained)}) could not be "
            "downloaded and are not in the weights cache (CLIP_CACHE_DIR). Without internet access: point "
            "CLIP_CACHE_DIR at a cache that holds them, point CLIP_MODEL=local-dir:/path at a folder holding "
            "open_clip_config.json and the weights, or try the service with CLIP_PRETRAINED=none "
            "(random weights: predictions are meaningless).",
            weights_dir,
        ) from None
    finally:
        root.removeFilter(_quiet_download_error)
    model.eval()
    if "MobileCLIP" in name:  # reparameterise MobileOne blocks for inference, as open_clip documents
        from timm.utils import reparameterize_model

        model = reparameterize_model(model)
    return model, preprocess


def _quiet_download_error(record: logging.LogRecord) -> bool:
    """open_clip logs its own ERROR before it raises; clip says it once, with the ways out."""
    return not record.getMessage().startswith("Failed to download weights")


def _untrained(name: str, pretrained: str) -> bool:
    """CLIP_PRETRAINED=none: random weights (local-dir: and hf-hub: bring their own, whatever it says)."""
    schema, _ = parse_model_name(name)
    return pretrained.lower() == "none" and schema is None


def shown(name: str, pretrained: str) -> dict[str, str]:
    """The model and its weights as answers show them: never a server's file paths."""
    return {"model": _display_name(name), "pretrained": _display_pretrained(name, pretrained)}


def _display_name(name: str) -> str:
    schema, folder = parse_model_name(name)
    if schema == "local-dir":  # the folder's name, e.g. local-dir:/models/ViT-B-32 -> ViT-B-32
        return os.path.basename(os.path.normpath(folder))
    return name


def _display_pretrained(name: str, pretrained: str) -> str:
    schema, _ = parse_model_name(name)
    if _untrained(name, pretrained):
        return "none"
    if schema == "local-dir":
        return "local-dir:" + _display_name(name)
    if schema == "hf-hub":
        return name
    return os.path.basename(pretrained) if os.path.sep in pretrained else pretrained
