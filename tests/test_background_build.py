"""A big label set asked for at run time (imagenet1k: 80,000 prompts) is built by a child process at the
lowest priority, never on the model thread: requests for it answer 503 label_set_warming with its progress in
GET /, pictures keep being classified meanwhile, a failed build is said once and started again by a later
request, and the child dies with the function. The child is held after its first chunk (the test hold in
background_build.py), so "while it builds" is a fact of the test, never a matter of timing."""
import os
import signal

import requests
from clip.background_build import BACKGROUND_PROMPTS, HOLD_ENV
from support.images import noise_image
from support.servers import FunctionProcess, wait_until

TEMPLATES = [f"a photo of a {{}}, take {i}." for i in range(18)]
LABELS = [f"thing{i:03d}" for i in range(-(-BACKGROUND_PROMPTS // len(TEMPLATES)) + 1)]  # just over the threshold
PROMPTS = len(LABELS) * len(TEMPLATES)


def big_set_env(clip_env, tmp_path):
    where = tmp_path / "sets"
    where.mkdir()
    (where / "things.txt").write_text("\n".join(LABELS) + "\n")
    (where / "things.templates").write_text("\n".join(TEMPLATES) + "\n")
    hold = tmp_path / "hold"
    hold.mkdir()
    env = {**clip_env, "CLIP_CACHE_DIR": str(tmp_path / "cache"), "CLIP_LABEL_SETS_DIR": str(where),
           "CLIP_PRELOAD_LABEL_SETS": "cifar10", HOLD_ENV: str(hold)}
    return env, hold


def held_children(hold):
    return sorted(int(p.name) for p in hold.iterdir() if p.name != "release")


def classify(fn, label_set):
    return requests.post(fn.url, data=noise_image("PNG"), params={"label_set": label_set}, timeout=60)


def described(fn):
    return requests.get(fn.url, timeout=30).json()


def nice(pid):
    """The nice value of a process (/proc/PID/stat's 19th field; the command name may hold spaces)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped
    except FileNotFoundError:
        return True


def function_log(fn):
    fn.output()  # flushed
    return (fn.dir / "function.log").read_text()  # all of it: output() keeps only the end


def test_a_big_set_is_built_by_a_child_at_the_lowest_priority_and_a_killed_build_starts_again(clip_env, tmp_path):
    env, hold = big_set_env(clip_env, tmp_path)
    with FunctionProcess("clip", tmp_path / "fn", env) as fn:
        before = described(fn)
        assert before["label_sets"]["things"] == {"labels": len(LABELS), "templates": len(TEMPLATES),
                                                  "source": "CLIP_LABEL_SETS_DIR/things.txt", "ready": False}
        first = classify(fn, "things")
        assert first.status_code == 503 and first.json()["error"]["code"] == "label_set_warming", first.text
        wait_until(lambda: held_children(hold), 120, 0.02, "the background build's first chunk")
        [child] = held_children(hold)
        assert nice(child) == 19
        building = described(fn)["label_sets"]["things"]
        assert building["ready"] is False and 0 < building["progress"] < 1, building
        assert classify(fn, "cifar10").status_code == 200  # the model thread serves pictures meanwhile
        assert classify(fn, "things").status_code == 503
        assert held_children(hold) == [child]  # one build per set at a time

        os.kill(child, signal.SIGKILL)
        wait_until(lambda: "progress" not in described(fn)["label_sets"]["things"], 60, 0.05, "the failure seen")
        (hold / str(child)).unlink()
        again = classify(fn, "things")  # a later request starts the build again
        assert again.status_code == 503 and again.json()["error"]["code"] == "label_set_warming", again.text
        wait_until(lambda: held_children(hold), 120, 0.02, "the second build's first chunk")
        (hold / "release").touch()
        wait_until(lambda: classify(fn, "things").status_code == 200, 120, 0.2, "the set served")
        answer = classify(fn, "things").json()
        after = described(fn)
        log = function_log(fn)
    assert answer["label_set"] == "things" and {p["label"] for p in answer["predictions"]} <= set(LABELS)
    assert after["label_sets"]["things"]["ready"] is True and "progress" not in after["label_sets"]["things"]
    assert after["stats"]["jobs"] == before["stats"]["jobs"], "the model thread encoded part of the set"
    assert f"encoding {PROMPTS} prompts for things" not in log, log  # the in-process build's line
    assert log.count(f"building label set things in a background process: {PROMPTS} prompts") == 2, log
    assert log.count("label set things: the background build failed (killed by SIGKILL)") == 1, log
    assert "Traceback" not in log, log
    assert len(list((tmp_path / "cache" / "embeddings").glob("things-*.npy"))) == 1  # cached for the next start


def test_the_background_build_dies_with_the_function(clip_env, tmp_path):
    env, hold = big_set_env(clip_env, tmp_path)
    with FunctionProcess("clip", tmp_path / "fn", env) as fn:
        assert classify(fn, "things").status_code == 503
        wait_until(lambda: held_children(hold), 120, 0.02, "the background build's first chunk")
        [child] = held_children(hold)
        fn.stop()  # SIGTERM: the host drains and exits
        wait_until(lambda: gone(child), 60, 0.05, "the build gone with the function")


def test_the_page_says_how_far_a_set_being_prepared_is():
    """index shows clip's progress where it offers the sets: "imagenet1k (being prepared, 37 %)"."""
    from frontend.index import clip_client, handler
    about = {"labels": 1000, "templates": 80, "source": "built-in"}
    doc = {"ready": True, "model": "ViT-B-32", "pretrained": "none", "untrained": True,
           "default_label_set": "cifar100", "limits": {"max_images": 16, "max_body_bytes": 1 << 20},
           "label_sets": {"cifar100": {**about, "ready": True}, "imagenet1k": {**about, "ready": False,
                                                                               "progress": 0.3712},
                          "cifar10": {**about, "ready": False}, "odd": {**about, "ready": False, "progress": "x"}}}
    info, _ = clip_client.shape_description(doc)
    assert info["preparing"] == {"imagenet1k": 37}  # a set not asked for yet, or an odd figure: nothing said
    html = handler._render(None, None, info)
    assert ">imagenet1k (being prepared, 37 %)</option>" in html
    assert ">cifar10</option>" in html and ">odd</option>" in html
