"""Served probabilities equal a direct open_clip zero-shot computation (same weights, same prompts).

The reference is written here from the published recipe, independently of backend/clip/labels.py:
a class embedding is the mean of its 18 L2-normalised prompt embeddings, normalised again, and
scores are softmax(logit_scale.exp() * cosine) over the whole label set.
"""
import io
import json
from concurrent.futures import ThreadPoolExecutor

import open_clip
import pytest
import requests
import torch
from PIL import Image
from support.images import noise_image

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_model, clip_server):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")
    data = json.load(open(clip_server.dir / "function" / "zero_shot.json"))
    names = [c.replace("_", " ") for c in data["cifar100"]]
    with torch.no_grad():
        rows = []
        for name in names:
            prompts = tokenizer([t.format(name) for t in data["cifar_templates"]])
            prompt_features = torch.nn.functional.normalize(model.encode_text(prompts), dim=-1)
            rows.append(torch.nn.functional.normalize(prompt_features.mean(dim=0), dim=-1))
        classes = torch.stack(rows)

    def probabilities(png):
        with torch.no_grad():
            image = preprocess(Image.open(io.BytesIO(png))).unsqueeze(0)
            features = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
            probs = (model.logit_scale.exp() * features @ classes.T).softmax(dim=-1)[0]
        return {name: float(p) for name, p in zip(names, probs)}
    return probabilities


def assert_matches(served, expected):
    assert len(served) == 100
    for row in served:
        assert abs(row["score"] - expected[row["label"]]) < TOLERANCE, row
    order = sorted(expected, key=expected.get, reverse=True)
    top = [row["label"] for row in served[:3]]
    assert top == order[:3]


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (300, 200), (50, 120)])
def test_one_png_matches_open_clip(clip_server, reference, size):
    png = noise_image("PNG", size=size, seed=size[0])
    served = requests.post(clip_server.url, data=png, params={"top_k": 100}, timeout=60).json()["predictions"]
    assert_matches(served, reference(png))


def test_batched_pngs_match_open_clip(clip_server, reference):
    """Concurrent requests share forward passes; that must not change any answer."""
    pngs = [noise_image("PNG", size=(80 + 8 * i, 70), seed=i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda png: requests.post(clip_server.url, data=png, params={"top_k": 100},
                                                            timeout=60).json(), pngs))
    for png, answer in zip(pngs, answers):
        assert_matches(answer["predictions"], reference(png))
    batch = requests.post(clip_server.url, files=[("image", p) for p in pngs[:3]], params={"top_k": 100},
                          timeout=60).json()["results"]
    for png, result in zip(pngs, batch):
        assert_matches(result["predictions"], reference(png))
