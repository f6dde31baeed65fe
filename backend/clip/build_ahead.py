"""Build ahead (at image build): download the weights and cache the label-set embeddings.

    python -m function.build_ahead [--label-sets cifar100,cifar10,imagenet1k] [--dtypes fp32,bf16]   (inside the image)

Runs the same model factory and label code as the function, with the same CLIP_* environment,
so a cold start finds everything in CLIP_CACHE_DIR and downloads and encodes nothing. It embeds the
sets --label-sets names (default: CLIP_PRELOAD_LABEL_SETS) and, always, every set read from a file (the
function's label_sets/ folder, CLIP_LABEL_SETS_DIR): a file set is shipped to be used. Embedding caches are
keyed by dtype. CLIP_DTYPE=auto decides on the processor the function runs on: auto bakes fp32,
plus bf16 where the building processor runs bf16 natively (elsewhere emulated bf16 takes many minutes).
Building for bf16 nodes on a processor without it: --dtypes fp32,bf16 (slow) or let the first start
encode (fast on such a node).
"""

import argparse
import logging
import time
from collections.abc import Sequence

from settings import SettingError

from . import config, precision
from . import model as model_module
from .labels import LabelStore, label_sets


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--label-sets",
        default=None,
        help="comma-separated sets to embed (default: CLIP_PRELOAD_LABEL_SETS); 'all' for every set; every "
        "set from a file is embedded too, always",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated dtypes to embed in (default: CLIP_DTYPE; auto: fp32, and bf16 "
        "where this processor runs it natively)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    try:
        settings = config.from_env()
    except SettingError as exc:  # a bad setting or label-set file: its one line fails the build
        raise SystemExit(f"build_ahead: {exc}") from None
    sets = label_sets(settings)
    if args.label_sets is None:
        chosen = settings.preload_label_sets
    else:
        chosen = tuple(sets) if args.label_sets == "all" else tuple(n for n in args.label_sets.split(",") if n)
    names = tuple(dict.fromkeys([*chosen, *(f.name for f in settings.file_sets)]))
    unknown = [n for n in names if n not in sets]
    if unknown:
        parser.error(f"unknown label sets {unknown}; known: {', '.join(sets)}")
    dtypes = args.dtypes or settings.dtype
    if dtypes == "auto":
        dtypes = precision.baked_dtypes(precision.cpu_features())
    dtypes = [d.strip() for d in dtypes.split(",") if d.strip()]
    wrong = [d for d in dtypes if d not in precision.DTYPES]
    if wrong:
        parser.error(f"unknown dtypes {wrong}; known: {', '.join(precision.DTYPES)}")
    for dtype in dtypes:
        clip = model_module.create(
            settings.model, settings.pretrained, settings.device, settings.cache_dir, settings.threads, dtype
        )
        store = LabelStore(clip, settings.cache_dir, settings.custom_templates, sets=sets)
        for name in names:
            started = time.perf_counter()
            store.build(name)
            print(f"{name} ({dtype}): {store.cache_path(sets[name])} ({time.perf_counter() - started:.1f} s)")
        del clip, store


if __name__ == "__main__":
    main()
