"""Build ahead (at image build): download the weights and cache the label-set embeddings.

    python -m function.warm [--label-sets cifar100,cifar10,imagenet1k]    (inside the image)

Runs the same model factory and label code as the function, with the same CLIP_* environment,
so a cold start finds everything in CLIP_CACHE_DIR and downloads nothing.
"""
import argparse
import logging
import time

from . import config
from . import model as model_module
from .labels import LABEL_SETS, LabelStore


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-sets", default=None,
                        help="comma-separated sets to embed (default: CLIP_PRELOAD_LABEL_SETS); 'all' for every set")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    settings = config.from_env()
    names = settings.preload_label_sets if args.label_sets is None else (
        tuple(LABEL_SETS) if args.label_sets == "all" else tuple(n for n in args.label_sets.split(",") if n))
    unknown = [n for n in names if n not in LABEL_SETS]
    if unknown:
        parser.error(f"unknown label sets {unknown}; known: {', '.join(LABEL_SETS)}")
    clip = model_module.create(settings.model, settings.pretrained, settings.device, settings.cache_dir,
                               settings.threads)
    store = LabelStore(clip, settings.cache_dir)
    for name in names:
        started = time.perf_counter()
        store.build(name)
        print(f"{name}: {store.cache_path(LABEL_SETS[name])} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
