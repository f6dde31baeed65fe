"""Custom labels: encoded once each, however many requests ask for them at the same moment. Built-in
label sets: a cached file is used only when it fits the model, and an unwritable cache costs nothing but
the file."""
import logging
import os
import threading

import numpy as np
import pytest
import requests
import torch
from clip import labels as labels_module
from clip.labels import LabelStore
from support.images import noise_image
from support.servers import FunctionProcess, wait_until


class SlowTextModel:
    """Stands in for the model's text tower: a distinct vector per prompt, counting prompts. With a
    gate, each encoding waits there until the test opens it."""
    weights_id = "fake"
    dtype = torch.float32

    def __init__(self, gate=None, fail=False):
        self.gate, self.fail, self.prompts = gate, fail, []

    def encode_texts(self, texts):
        self.prompts.extend(texts)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("out of memory")
        return torch.stack([torch.tensor([float(len(t)), float(sum(map(ord, t)) % 97), 1.0]) for t in texts])


def ask_together(store, label_lists):
    """Every request asks while the first encoding is held: the gate opens only once each one has
    looked its labels up, however the threads are scheduled. Returns the answers, the errors and what
    each lookup found (its counts: hit, miss, shared)."""
    answers, errors, looked_up = [None] * len(label_lists), [], []

    def ask(i):
        lookup = store.look_up(label_lists[i])
        looked_up.append(lookup.counts())
        try:
            answers[i] = store.embed(lookup)
        except RuntimeError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(label_lists))]
    [t.start() for t in threads]
    wait_until(lambda: len(looked_up) == len(label_lists), 30, 0.005, "every request looked its labels up")
    store.model.gate.set()
    [t.join(30) for t in threads]
    return answers, errors, looked_up


def test_concurrent_requests_for_new_labels_encode_each_label_once(tmp_path):
    model = SlowTextModel(threading.Event())
    store = LabelStore(model, str(tmp_path))
    lists = [["cat", "dog"]] * 6 + [["dog", "bird"]] * 2
    answers, errors, looked_up = ask_together(store, lists)
    assert not errors
    # each label is one request's miss; every other request shares that encoding, none found it cached
    assert sum(counts["miss"] for counts in looked_up) == 3
    assert sum(counts["shared"] for counts in looked_up) == 6 * 2 + 2 * 2 - 3
    assert sum(counts["hit"] for counts in looked_up) == 0
    assert store.look_up(["cat", "bird"]).counts() == {"hit": 2, "miss": 0, "shared": 0}
    assert sorted(model.prompts) == sorted(["a photo of a bird.", "a photo of a cat.", "a photo of a dog."])
    alone = LabelStore(SlowTextModel(), str(tmp_path))
    for labels, answer in zip(lists, answers):
        np.testing.assert_array_equal(answer, alone.custom(labels))  # every request got its own rows, in order


def test_a_failed_encoding_fails_those_waiting_for_it_and_is_retried_later(tmp_path):
    model = SlowTextModel(threading.Event(), fail=True)
    store = LabelStore(model, str(tmp_path))
    answers, errors, _ = ask_together(store, [["cat"]] * 4)
    assert len(errors) == 4 and answers == [None] * 4
    assert model.prompts == ["a photo of a cat."]
    model.fail = False
    assert store.custom(["cat"]).shape == (1, 3)  # nothing poisoned: encoded afresh
    assert model.prompts == ["a photo of a cat."] * 2


def test_the_label_cache_is_bounded(tmp_path):
    model = SlowTextModel()
    store = LabelStore(model, str(tmp_path), lru_size=3)
    store.custom(["a", "b", "c", "d"])
    store.custom(["d"])
    assert len(model.prompts) == 4  # "d" was kept
    store.custom(["a"])
    assert len(model.prompts) == 5  # "a" had been evicted


# ---- built-in label sets: the disk cache is checked against the model, and may be unwritable ----------

CIFAR10 = labels_module.LABEL_SETS["cifar10"]
CIFAR10_PROMPTS = len(CIFAR10.classes) * len(CIFAR10.templates)


def set_prompts(model):
    """The prompts of the cifar10 set that were encoded (not the one-prompt probe of the model's width)."""
    return [p for p in model.prompts if p != labels_module.WIDTH_PROBE]


def good_embeddings():
    return labels_module.class_embeddings(SlowTextModel().encode_texts, CIFAR10.labels, CIFAR10.templates)


def unit_rows(array):
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


FOREIGN_FILES = {
    "another model's width": lambda: unit_rows(np.random.default_rng(0).normal(size=(10, 512))).astype(np.float32),
    "float64": lambda: good_embeddings().astype(np.float64),
    "float16": lambda: good_embeddings().astype(np.float16),
    "NaN": lambda: np.where(np.arange(30).reshape(10, 3) == 4, np.nan, good_embeddings()).astype(np.float32),
    "inf": lambda: np.where(np.arange(30).reshape(10, 3) == 7, np.inf, good_embeddings()).astype(np.float32),
    "not unit rows": lambda: (good_embeddings() * 3).astype(np.float32),
    "one row short": lambda: good_embeddings()[:9],
    "one dimension": lambda: good_embeddings().ravel(),
}


@pytest.mark.parametrize("kind", FOREIGN_FILES)
def test_a_cached_label_set_that_does_not_fit_the_model_is_rebuilt(tmp_path, caplog, kind):
    store = LabelStore(SlowTextModel(), str(tmp_path))
    path = store.cache_path(CIFAR10)
    os.makedirs(os.path.dirname(path))
    np.save(path, FOREIGN_FILES[kind](), allow_pickle=False)
    with caplog.at_level(logging.WARNING, logger="labels"):
        built = store.build("cifar10")
    assert len(set_prompts(store.model)) == CIFAR10_PROMPTS, "the foreign file was served"
    np.testing.assert_allclose(built, good_embeddings(), rtol=1e-6)
    assert [r for r in caplog.records if "ignoring embedding cache" in r.getMessage()], "rebuilt without a word"
    again = LabelStore(SlowTextModel(), str(tmp_path))  # the next start: the rebuilt file is used as it is
    np.testing.assert_array_equal(again.build("cifar10"), built)
    assert set_prompts(again.model) == []


def test_a_cached_label_set_that_fits_is_used_without_encoding(tmp_path):
    first = LabelStore(SlowTextModel(), str(tmp_path))
    built = first.build("cifar10")
    assert len(set_prompts(first.model)) == CIFAR10_PROMPTS
    second = LabelStore(SlowTextModel(), str(tmp_path))
    np.testing.assert_array_equal(second.build("cifar10"), built)
    assert set_prompts(second.model) == []


def test_a_set_cached_on_disk_is_served_by_its_first_request_without_encoding(tmp_path):
    """A set baked into the image but not preloaded: its first request reads the file (no 503 while a
    background build runs), once the model's width is known (the service learns it at start)."""
    built = LabelStore(SlowTextModel(), str(tmp_path)).build("cifar10")
    store = LabelStore(SlowTextModel(), str(tmp_path))
    store.width()
    served = store.get_set("cifar10")
    assert served is not None and store.ready("cifar10")
    np.testing.assert_array_equal(served, built)
    assert set_prompts(store.model) == []


def test_an_unwritable_cache_serves_label_sets_from_memory_with_one_warning(tmp_path, caplog):
    """A read-only or full cache directory: the sets are built once and served from memory (never a 503
    forever, never rebuilt per request), and the log says so once, without a traceback. (The cache sits
    under a regular file, which no one can write into, root included.)"""
    (tmp_path / "file").write_text("not a directory")
    store = LabelStore(SlowTextModel(), str(tmp_path / "file" / "cache"))
    with caplog.at_level(logging.INFO, logger="labels"):
        assert store.get_set("cifar10") is None  # the first request starts the build
        wait_until(lambda: store.ready("cifar10") or "failed" in caplog.text, 60, 0.01, "cifar10 built")
        served = store.get_set("cifar10")
        assert served is not None and store.get_set("cifar10") is served
        assert store.build("cifar100").shape[0] == 100  # a preloaded set, the same way
    assert len(set_prompts(store.model)) == CIFAR10_PROMPTS + 100 * len(CIFAR10.templates), "built once each"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "served from memory" in warnings[0].getMessage(), caplog.text
    assert not any(r.exc_info for r in caplog.records), "a traceback in the log"


def test_clip_with_an_unwritable_cache_answers_a_label_set_it_did_not_preload(clip_env, tmp_path):
    """The served function: the first request for a set not preloaded gets 503 label_set_warming while it
    builds, then it is served from memory; the log has one warning and no traceback."""
    (tmp_path / "file").write_text("not a directory")
    env = {**clip_env, "CLIP_CACHE_DIR": str(tmp_path / "file" / "cache"), "CLIP_PRELOAD_LABEL_SETS": "cifar10"}
    with FunctionProcess("clip", tmp_path, env) as fn:
        def classify():
            return requests.post(fn.url, data=noise_image("PNG"), params={"label_set": "cifar100"}, timeout=60)
        first = classify()
        assert first.status_code in (200, 503), first.text
        if first.status_code == 503:
            assert first.json()["error"]["code"] == "label_set_warming"
            wait_until(lambda: classify().status_code == 200, 120, 0.2, "cifar100 served")
        assert classify().status_code == 200
        fn.output()  # flushed
        log = (fn.dir / "function.log").read_text()  # all of it: output() keeps the end, which the polls fill
    assert log.count("encoding 1800 prompts for cifar100") == 1, "built more than once"
    assert log.count("cannot write the label-set cache") == 1 and "Traceback" not in log, log


# ---- a big set asked for at run time goes to a background build (background_build.py) ---------------


class FakeBackground:
    """Stands in for background_build.Background: records each start; the test ends each build."""

    def __init__(self):
        self.started = []

    def start(self, name, out, finished):
        child = labels_module.Child(name, out)
        self.started.append((name, out, finished))
        return child


def test_only_a_big_set_asked_for_at_run_time_is_built_in_the_background(tmp_path, caplog):
    background = FakeBackground()
    model = SlowTextModel()
    store = LabelStore(model, str(tmp_path), background=background)
    store.width()
    with caplog.at_level(logging.INFO, logger="labels"):
        assert store.get_set("imagenet1k") is None and store.get_set("imagenet1k") is None
        assert [name for name, _, _ in background.started] == ["imagenet1k"]  # one build at a time
        assert store.progress("imagenet1k") == 0.0 and not store.ready("imagenet1k")
        name, out, finished = background.started[0]
        assert out == store.cache_path(labels_module.LABEL_SETS["imagenet1k"])
        finished(-9)  # killed
        assert store.progress("imagenet1k") is None
        assert "label set imagenet1k: the background build failed (killed by SIGKILL)" in caplog.text
        assert store.get_set("imagenet1k") is None and len(background.started) == 2  # asked again: built again
        _, out, finished = background.started[1]
        built = unit_rows(np.random.default_rng(1).normal(size=(1000, 3))).astype(np.float32)
        labels_module._save(out, built)
        finished(0)
        np.testing.assert_array_equal(store.get_set("imagenet1k"), built)
        assert store.ready("imagenet1k") and store.progress("imagenet1k") is None
        assert store.get_set("cifar10") is None  # small: built here, on the model's thread (run), as before
        wait_until(lambda: store.ready("cifar10"), 60, 0.01, "cifar10 built")
    assert len(background.started) == 2
    assert len(set_prompts(model)) == CIFAR10_PROMPTS  # imagenet1k's prompts were never encoded here


def test_a_set_built_here_says_how_far_it_is(tmp_path):
    seen = []
    model = SlowTextModel()
    store = LabelStore(model, str(tmp_path), chunk=CIFAR10_PROMPTS // 3)
    store.width()
    encode = model.encode_texts
    model.encode_texts = lambda texts: (seen.append(store.progress("cifar10")), encode(texts))[1]
    store.build("cifar10")
    assert seen == [0.0, round(1 / 3, 4), round(2 / 3, 4)]
    assert store.progress("cifar10") is None and store.ready("cifar10")


def test_a_background_build_with_an_unwritable_cache_is_served_from_memory(tmp_path, caplog):
    """The child writes into a scratch folder of its own, read back once and removed; one warning."""
    (tmp_path / "file").write_text("not a directory")
    background = FakeBackground()
    store = LabelStore(SlowTextModel(), str(tmp_path / "file" / "cache"), background=background)
    store.width()
    with caplog.at_level(logging.INFO, logger="labels"):
        assert store.get_set("imagenet1k") is None
        [(_, out, finished)] = background.started
        assert not out.startswith(str(tmp_path))
        built = unit_rows(np.random.default_rng(2).normal(size=(1000, 3))).astype(np.float32)
        labels_module._save(out, built)
        finished(0)
    np.testing.assert_array_equal(store.get_set("imagenet1k"), built)
    assert not os.path.exists(os.path.dirname(out))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "served from memory" in warnings[0].getMessage(), caplog.text
