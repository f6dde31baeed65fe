"""CLIP_DTYPE: what auto picks on which processor, and what bf16 costs in accuracy against fp32."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from clip import model as model_module
from clip import precision
from clip.images import load_image
from clip.labels import LABEL_SETS, SIMPLE_TEMPLATES, LabelStore, class_embeddings
from clip.precision import CpuFeatures, choose
from support.images import noise_image
from support.servers import FunctionProcess

AVX2 = CpuFeatures(amx_bf16=False, avx512_bf16=False, capability="AVX2", source="test")
AMX = CpuFeatures(amx_bf16=True, avx512_bf16=True, capability="AVX512", source="test")
ZEN4 = CpuFeatures(amx_bf16=False, avx512_bf16=True, capability="AVX512", source="test")
# bf16 against fp32 on the same weights (measured worst cases are in docs/performance.md; these
# bounds leave room for other processors' rounding)
MIN_FEATURE_COSINE = 0.9995
# Worst |Δp| over CIFAR-100's 100 scores (softmax at logit scale 100 turns a 1e-4 cosine error into
# ~1e-2 of logit): measured 0.0016 with the served 18-prompt class embeddings, 0.061 with one prompt a
# class (custom labels): averaging 18 prompts averages their rounding away.
MAX_PROBABILITY_DELTA = {"18 prompts": 0.01, "1 prompt": 0.1}


def never(*_):
    raise AssertionError("no measurement expected here")


def test_auto_is_fp32_without_native_bf16_and_says_why():
    chosen = choose("auto", "cpu", AVX2, measure=never)
    assert chosen.dtype == torch.float32
    assert "no AMX-BF16, no AVX512-BF16" in chosen.reason and "AVX2" in chosen.reason


@pytest.mark.parametrize("features", [AMX, ZEN4])
def test_auto_is_bf16_where_native_and_measured_faster(features):
    chosen = choose("auto", "cpu", features, measure=lambda: (0.056, 0.028))
    assert chosen.dtype == torch.bfloat16 and chosen.name == "bf16"
    assert "AVX512-BF16" in chosen.reason and "28.0 ms in bf16 against 56.0 ms in fp32" in chosen.reason


def test_auto_stays_fp32_where_bf16_is_native_but_not_faster():
    chosen = choose("auto", "cpu", ZEN4, measure=lambda: (0.050, 0.048))
    assert chosen.dtype == torch.float32 and "48.0 ms in bf16 against 50.0 ms" in chosen.reason


def test_auto_measures_for_real_when_told_bf16_is_native():
    """On this machine's real kernels: bf16 is only chosen if it really is faster here."""
    fp32_s, bf16_s = precision.measure_bf16(repeats=2)
    chosen = choose("auto", "cpu", AMX, measure=lambda: (fp32_s, bf16_s))
    assert chosen.dtype == (torch.bfloat16 if bf16_s <= fp32_s * precision.BF16_MUST_BE_FASTER else torch.float32)


def test_this_processor_is_judged_from_what_it_reports():
    features = precision.cpu_features()
    flags = precision._cpuinfo_flags()
    if not {"amx_bf16", "avx512_bf16"} & flags:
        assert not features.native_bf16
        assert choose("auto", "cpu", features, measure=never).dtype == torch.float32


def test_cpuinfo_answers_where_torch_cannot(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    features = precision.cpu_features(str(cpuinfo))
    assert features.source == "cpuinfo" and features.avx512_bf16 and not features.amx_bf16


def test_auto_bakes_bf16_ahead_only_where_it_may_be_chosen():
    assert precision.baked_dtypes(AVX2) == "fp32"
    assert precision.baked_dtypes(ZEN4) == precision.baked_dtypes(AMX) == "fp32,bf16"


def test_forced_dtypes_and_cuda():
    assert choose("bf16", "cpu", AVX2, measure=never).dtype == torch.bfloat16
    assert "emulated" in choose("bf16", "cpu", AVX2, measure=never).reason
    assert choose("fp32", "cpu", AMX, measure=never).dtype == torch.float32
    assert choose(" FP16 ", "cpu", AVX2, measure=never).dtype == torch.float16
    assert choose("auto", "cuda", measure=never).dtype == torch.float16
    assert choose("bf16", "cuda", measure=never, cuda_bf16=True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no bf16 support"):
        choose("bf16", "cuda", measure=never, cuda_bf16=False)
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        choose("int8", "cpu", AVX2, measure=never)


@pytest.fixture(scope="module")
def both(tiny_model):
    """The tiny model in fp32 and in bf16 (same weights), 16 images, and CIFAR-100's class embeddings
    as served (18 prompts a class) and as custom labels are made (one prompt a label)."""
    cifar = LABEL_SETS["cifar100"]
    images = [noise_image("PNG", size=(64 + 8 * i, 64), seed=i) for i in range(16)]
    out = {}
    for name in ("fp32", "bf16"):
        clip = model_module.create(f"local-dir:{tiny_model}", "none", device="cpu", dtype=name)
        features = clip.encode_prepared([clip.prepare(load_image(b, 10**7, clip.image_size)) for b in images])
        out[name] = (clip, features.numpy(),
                     {"18 prompts": class_embeddings(clip.encode_texts, cifar.labels, cifar.templates),
                      "1 prompt": class_embeddings(clip.encode_texts, cifar.labels, SIMPLE_TEMPLATES)})
    return out


def probabilities(clip, features, classes):
    logits = clip.logit_scale * features @ classes.T
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_bf16_computes_in_bf16_and_stays_close_to_fp32(both):
    (c32, f32, t32), (c16, f16, t16) = both["fp32"], both["bf16"]
    assert next(c16.model.parameters()).dtype == torch.bfloat16 and f16.dtype == np.float32
    assert c16.logit_scale == c32.logit_scale  # taken before rounding: bf16 would make 100 into 98.9
    assert not np.array_equal(f16, f32)  # bf16 really ran
    assert (f16 * f32).sum(axis=1).min() >= MIN_FEATURE_COSINE
    for recipe, bound in MAX_PROBABILITY_DELTA.items():
        assert not np.array_equal(t16[recipe], t32[recipe])
        assert (t16[recipe] * t32[recipe]).sum(axis=1).min() >= MIN_FEATURE_COSINE
        p32, p16 = probabilities(c32, f32, t32[recipe]), probabilities(c16, f16, t16[recipe])
        assert np.abs(p16 - p32).max() <= bound, recipe
        assert (p16.argmax(axis=1) == p32.argmax(axis=1)).all(), recipe


def test_label_caches_are_keyed_by_dtype(both, tmp_path):
    paths = {name: LabelStore(clip, str(tmp_path)).cache_path(LABEL_SETS["cifar10"])
             for name, (clip, _, _) in both.items()}
    assert paths["fp32"] != paths["bf16"]


@pytest.fixture(scope="module")
def bf16_cache(both, clip_env, clip_server, tmp_path_factory):
    """A cache directory of its own for the bf16 function (whatever other tests left in the shared one),
    holding the fp32 function's cifar10 embeddings: the file a dtype-blind cache would wrongly reuse."""
    fp32 = LabelStore(both["fp32"][0], clip_env["CLIP_CACHE_DIR"]).cache_path(LABEL_SETS["cifar10"])
    assert Path(fp32).is_file(), "the fp32 function preloads cifar10"
    cache = tmp_path_factory.mktemp("cache-bf16")
    (cache / "embeddings").mkdir()
    shutil.copy(fp32, cache / "embeddings")
    return cache


@pytest.fixture(scope="module")
def bf16_server(clip_env, bf16_cache, tmp_path_factory):
    """A clip function forced to bf16, on the tiny model, on any processor (oneDNN emulates bf16 where
    it is not native): the bf16 path is tested everywhere, only its speed depends on the machine."""
    env = {**clip_env, "CLIP_DTYPE": "bf16", "CLIP_LABEL_SET": "cifar10", "CLIP_PRELOAD_LABEL_SETS": "cifar10",
           "CLIP_CACHE_DIR": str(bf16_cache)}
    with FunctionProcess("clip", tmp_path_factory.mktemp("clip-bf16"), env) as fn:
        yield fn


def test_served_description_names_the_dtype_and_why(clip_server, bf16_server):
    fp32 = requests.get(clip_server.url, timeout=10).json()
    bf16 = requests.get(bf16_server.url, timeout=10).json()
    assert (fp32["dtype"], fp32["dtype_setting"]) == ("float32", "fp32") and "CLIP_DTYPE=fp32" in fp32["dtype_reason"]
    assert (bf16["dtype"], bf16["dtype_setting"]) == ("bfloat16", "bf16") and "CLIP_DTYPE=bf16" in bf16["dtype_reason"]
    # CLIP_MAX_BATCH unset: each dtype's own default
    assert fp32["limits"]["max_batch"] == 8 and bf16["limits"]["max_batch"] == 16
    assert "dtype bf16" in bf16_server.output()  # and the log says it


def test_served_bf16_scores_stay_close_to_fp32(clip_server, bf16_server, bf16_cache):
    png = noise_image("PNG", size=(90, 70), seed=42)
    for params in ({"label_set": "cifar10", "top_k": 10}, {"labels": "cat,dog,a red car,tree", "top_k": 4}):
        answers = [requests.post(server.url, data=png, params=params, timeout=60).json()["predictions"]
                   for server in (clip_server, bf16_server)]
        fp32, bf16 = ({row["label"]: row["score"] for row in answer} for answer in answers)
        assert fp32.keys() == bf16.keys()
        bound = MAX_PROBABILITY_DELTA["1 prompt" if "labels" in params else "18 prompts"]
        assert max(abs(fp32[label] - bf16[label]) for label in fp32) <= bound
    # the bf16 function encoded its own cifar10 embeddings rather than loading the fp32 ones
    assert len(list((bf16_cache / "embeddings").glob("cifar10-*.npy"))) == 2
    assert "encoding 180 prompts for cifar10" in bf16_server.output()


def test_build_ahead_bakes_each_dtype_asked_for(tiny_model, tmp_path):
    """build_ahead.py: auto bakes fp32 (plus bf16 only where this processor runs it natively); --dtypes both."""
    root = Path(__file__).resolve().parents[1]
    backend = root / "backend"
    # the host's modules (settings.py) beside the function, as in the image's /home/app
    env = {**os.environ, "CLIP_MODEL": f"local-dir:{tiny_model}", "CLIP_CACHE_DIR": str(tmp_path), "CLIP_DEVICE": "cpu",
           "PYTHONPATH": str(root / "template" / "python3-debian")}
    auto = len(precision.baked_dtypes(precision.cpu_features()).split(","))  # both kinds: the test above
    for extra, expected in (([], auto), (["--dtypes", "fp32,bf16"], 2)):
        for old in tmp_path.glob("embeddings/*"):
            old.unlink()
        run = subprocess.run([sys.executable, "-m", "clip.build_ahead", "--label-sets", "cifar10", *extra], cwd=backend,
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert len(list(tmp_path.glob("embeddings/cifar10-*.npy"))) == expected, run.stdout
    bad = subprocess.run([sys.executable, "-m", "clip.build_ahead", "--dtypes", "int8"], cwd=backend, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown dtypes" in bad.stderr
