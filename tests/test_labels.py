"""Custom labels: encoded once each, however many requests ask for them at the same moment."""
import threading

import numpy as np
import torch
from clip import labels as labels_module
from clip.labels import LabelStore
from support.servers import wait_until


class SlowTextModel:
    """Stands in for the model's text tower: a distinct vector per prompt, counting prompts. With a
    gate, each encoding waits there until the test opens it."""
    weights_id = "fake"

    def __init__(self, gate=None, fail=False):
        self.gate, self.fail, self.prompts = gate, fail, []

    def encode_texts(self, texts):
        self.prompts.extend(texts)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("out of memory")
        return torch.stack([torch.tensor([float(len(t)), float(sum(map(ord, t)) % 97), 1.0]) for t in texts])


def ask_together(store, label_lists, monkeypatch):
    """Every request asks while the first encoding is held: the gate opens only once each one has
    looked its labels up (the lookup counter has seen them all), however the threads are scheduled."""
    answers, errors, looked_up = [None] * len(label_lists), [], []
    count = labels_module.metrics.label_lookups
    monkeypatch.setattr(labels_module.metrics, "label_lookups", lambda **kw: (looked_up.append(kw), count(**kw)))

    def ask(i):
        try:
            answers[i] = store.custom(label_lists[i])
        except RuntimeError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(label_lists))]
    [t.start() for t in threads]
    wait_until(lambda: len(looked_up) == len(label_lists), 30, 0.005, "every request looked its labels up")
    store.model.gate.set()
    [t.join(30) for t in threads]
    return answers, errors


def test_concurrent_requests_for_new_labels_encode_each_label_once(tmp_path, monkeypatch):
    model = SlowTextModel(threading.Event())
    store = LabelStore(model, str(tmp_path))
    lists = [["cat", "dog"]] * 6 + [["dog", "bird"]] * 2
    answers, errors = ask_together(store, lists, monkeypatch)
    assert not errors
    assert sorted(model.prompts) == sorted(["a photo of a bird.", "a photo of a cat.", "a photo of a dog."])
    alone = LabelStore(SlowTextModel(), str(tmp_path))
    for labels, answer in zip(lists, answers):
        np.testing.assert_array_equal(answer, alone.custom(labels))  # every request got its own rows, in order


def test_a_failed_encoding_fails_those_waiting_for_it_and_is_retried_later(tmp_path, monkeypatch):
    model = SlowTextModel(threading.Event(), fail=True)
    store = LabelStore(model, str(tmp_path))
    answers, errors = ask_together(store, [["cat"]] * 4, monkeypatch)
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
