"""Label sets shipped as files (issue 26.1): NAME.txt (one label per line) and an optional NAME.templates
become label_set=NAME. A bad file stops clip at start with one line naming the file and the line, and exit
status 78, through the real template host; a good one classifies, is listed, preloaded, and baked by
build_ahead so that a restart encodes nothing."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import settings
from clip import config, label_files
from support.images import noise_image
from support.servers import FunctionProcess, wait_until

import localrun

ROOT = Path(__file__).resolve().parents[1]
KITCHEN = "# kitchen things\n\nteapot\ncoffee mug\n  frying pan  \n# a comment\nwhisk\n"


def folder(tmp_path, files):
    """A folder holding these files: {name: text or bytes}."""
    where = tmp_path / "sets"
    where.mkdir(exist_ok=True)
    for name, content in files.items():
        (where / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return where


def read(monkeypatch, where, **env):
    for name in list(os.environ):
        if name.startswith("CLIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLIP_LABEL_SETS_DIR", str(where))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config.from_env()


def test_a_file_is_a_set_of_its_lines_without_blanks_or_comments(tmp_path, monkeypatch):
    where = folder(tmp_path, {
        "kitchen.txt": KITCHEN,
        "kitchen.templates": "# prompts\na photo of a {}.\n\na {} on a counter.\n",
        "tools.txt": b"\xef\xbb\xbfhammer\r\nsaw\r\nt_square\r\n",  # a byte-order mark, CRLF, underscores kept
        "README.md": "not a set",
    })
    found = read(monkeypatch, where).file_sets
    assert [(s.name, s.labels, s.templates, s.shown) for s in found] == [
        ("kitchen", ("teapot", "coffee mug", "frying pan", "whisk"), ("a photo of a {}.", "a {} on a counter."),
         "CLIP_LABEL_SETS_DIR/kitchen.txt"),
        ("tools", ("hammer", "saw", "t_square"), (), "CLIP_LABEL_SETS_DIR/tools.txt"),
    ]
    assert read(monkeypatch, where, CLIP_LABEL_SET="KITCHEN", CLIP_PRELOAD_LABEL_SETS="tools,cifar10") \
        .preload_label_sets == ("tools", "cifar10")


def test_the_functions_own_folder_holds_no_set_by_default():
    """backend/clip/label_sets/ ships with a README only: no set is added unless an operator adds one."""
    assert label_files.read_all(label_files.folders(""), {}, 1000, 200) == {}
    assert (Path(label_files.FUNCTION_FOLDER) / "README.md").is_file()


def test_the_documented_example_is_a_good_set(monkeypatch):
    found = read(monkeypatch, ROOT / "docs" / "label-sets").file_sets
    assert [s.name for s in found] == ["kitchen"] and len(found[0].labels) == 10 and len(found[0].templates) == 3


TOO_MANY = "".join(f"label {i}\n" for i in range(4))
# (files, extra settings, the one line, with {dir} for the folder)
BAD = {
    "empty": ({"empty.txt": ""}, {},
              "{dir}/empty.txt: holds no label (one label per line; blank lines and lines starting with # are "
              "ignored)"),
    "comments only": ({"notes.txt": "# one\n\n# two\n"}, {},
                      "{dir}/notes.txt: holds no label (one label per line; blank lines and lines starting with # "
                      "are ignored)"),
    "duplicate": ({"kitchen.txt": "teapot\nkettle\n\nteapot\n"}, {},
                  "{dir}/kitchen.txt, line 4: 'teapot' repeats line 1"),
    "duplicate in another case": ({"kitchen.txt": "teapot\nKettle\nkettle\n"}, {},
                                  "{dir}/kitchen.txt, line 3: 'kettle' ('Kettle' whatever the case) repeats line 2"),
    "label too long": ({"kitchen.txt": "teapot\n# fine\nan electric kettle\n"}, {"CLIP_MAX_LABEL_CHARS": "10"},
                       "{dir}/kitchen.txt, line 3: a label of 18 characters; at most 10 (CLIP_MAX_LABEL_CHARS)"),
    "too many labels": ({"many.txt": TOO_MANY}, {"CLIP_MAX_LABELS": "3"},
                        "{dir}/many.txt, line 4: label 4; at most 3 (CLIP_MAX_LABELS)"),
    "not UTF-8": ({"kitchen.txt": b"teapot\nkettle\ncaf\xe9 cup\n"}, {},
                  "{dir}/kitchen.txt, line 3: not UTF-8 text"),
    "a built-in name": ({"cifar10.txt": "cat\n"}, {},
                        "{dir}/cifar10.txt: 'cifar10' is a built-in label set; give the file another name"),
    "a built-in name in capitals": ({"CIFAR100.txt": "cat\n"}, {},
                                    "{dir}/CIFAR100.txt: 'cifar100' is a built-in label set; give the file another "
                                    "name"),
    "custom": ({"custom.txt": "cat\n"}, {},
               "{dir}/custom.txt: 'custom' is the set a request's own labels make; give the file another name"),
    "two files, one name": ({"Kitchen.txt": "cat\n", "kitchen.txt": "dog\n"}, {},
                            "{dir}/kitchen.txt: the label set 'Kitchen' is already read from {dir}/Kitchen.txt"),
    "a bad name": ({"my set.txt": "cat\n"}, {},
                   "{dir}/my set.txt: a label set's name is letters, digits, _ and - (at most 64, starting with a "
                   "letter or digit), not 'my set'"),
    "a template without {}": ({"kitchen.txt": "teapot\n", "kitchen.templates": "a photo of a {}.\na photo.\n"}, {},
                              "{dir}/kitchen.templates, line 2: a template needs {} where the label goes, as in "
                              "'a photo of a {}.'"),
    "a template with another field": ({"kitchen.txt": "teapot\n", "kitchen.templates": "a {0} photo\n"}, {},
                                      "{dir}/kitchen.templates, line 1: only {} may stand in braces (write {{ and }} "
                                      "for a brace itself)"),
    "a lone brace": ({"kitchen.txt": "teapot\n", "kitchen.templates": "# ok\na {} photo {\n"}, {},
                     "{dir}/kitchen.templates, line 2: only {} may stand in braces (write {{ and }} for a brace "
                     "itself)"),
    "a repeated template": ({"kitchen.txt": "teapot\n", "kitchen.templates": "a {}.\na {}.\n"}, {},
                            "{dir}/kitchen.templates, line 2: 'a {}.' repeats line 1"),
    "no template": ({"kitchen.txt": "teapot\n", "kitchen.templates": "# none yet\n"}, {},
                    "{dir}/kitchen.templates: holds no template (one per line, {} where the label goes)"),
    "templates without labels": ({"kitchn.templates": "a {}.\n", "kitchen.txt": "teapot\n"}, {},
                                 "{dir}/kitchn.templates: prompt templates for no label set (there is no kitchn.txt)"),
}


def test_a_folder_that_is_not_there_is_named(tmp_path, monkeypatch):
    with pytest.raises(settings.SettingError) as refused:
        read(monkeypatch, tmp_path / "nowhere")
    assert str(refused.value) == f"CLIP_LABEL_SETS_DIR must be a folder, not '{tmp_path}/nowhere' (no such folder)"
    monkeypatch.setenv("CLIP_LABEL_SETS_DIR", "sets")
    with pytest.raises(settings.SettingError) as refused:
        config.from_env()
    assert str(refused.value) == ("CLIP_LABEL_SETS_DIR must be a folder, not 'sets' (no such folder; a relative path "
                                  "is read from the function's folder)")


def test_a_preloaded_set_must_be_there(tmp_path, monkeypatch):
    where = folder(tmp_path, {"kitchen.txt": KITCHEN})
    with pytest.raises(settings.SettingError) as refused:
        read(monkeypatch, where, CLIP_PRELOAD_LABEL_SETS="kitchen,tools")
    assert str(refused.value) == ("CLIP_PRELOAD_LABEL_SETS must be a comma-separated list of cifar100, cifar10, "
                                  "imagenet1k, kitchen, not 'kitchen,tools'")


# ---- through the real host: the one line in the log, exit status 78, no traceback ---------------------

@pytest.mark.parametrize("kind", BAD)
def test_a_bad_file_stops_clip_at_start_with_its_line_and_status_78(tmp_path, kind):
    files, env, line = BAD[kind]
    where = folder(tmp_path, files)
    clip = localrun.FunctionProcess("clip", tmp_path, {**env, "CLIP_LABEL_SETS_DIR": str(where)})  # no watchdog
    clip.start(wait_ready=False)
    try:
        wait_until(lambda: clip.process.poll() is not None, 120, what="clip to exit")
        output = clip.output()
    finally:
        clip.stop()
    assert clip.process.returncode == 78 and "Traceback" not in output, output
    errors = [text.partition(" ERROR ")[2] for text in output.splitlines() if " ERROR " in text]
    assert errors == [line.replace("{dir}", str(where))], output


def test_a_bad_file_in_the_functions_own_folder_stops_it_too(tmp_path):
    """The folder shipped in the image (function/label_sets/), as the build context lays it out."""
    clip = localrun.FunctionProcess("clip", tmp_path, {})
    (clip.dir / "function" / "label_sets" / "kitchen.txt").write_text("teapot\nteapot\n")
    clip.start(wait_ready=False)
    try:
        wait_until(lambda: clip.process.poll() is not None, 120, what="clip to exit")
        output = clip.output()
    finally:
        clip.stop()
    assert clip.process.returncode == 78, output
    assert f"{clip.dir}/function/label_sets/kitchen.txt, line 2: 'teapot' repeats line 1" in output, output


# ---- a good set, served ------------------------------------------------------------------------------

def build_ahead(env, *args):
    backend = ROOT / "backend"
    done = subprocess.run([sys.executable, "-m", "clip.build_ahead", *args], cwd=backend,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT / "template" / "python3-debian")},
                          capture_output=True, text=True, timeout=600)
    return done


def test_build_ahead_bakes_the_file_sets_and_a_restart_encodes_nothing(clip_env, tmp_path):
    """build_ahead embeds every file set, whatever --label-sets names (clip.yml's BUILD_HOOK_ARGS names
    built-in sets); the function started on that cache lists them, serves a preloaded one and one it did
    not preload at once (no 503), and encodes no prompt."""
    where = folder(tmp_path, {"kitchen.txt": KITCHEN, "kitchen.templates": "a photo of a {}.\na {} in a kitchen.\n",
                              "tools.txt": "hammer\nsaw\nt_square\n"})
    env = {**clip_env, "CLIP_CACHE_DIR": str(tmp_path / "cache"), "CLIP_LABEL_SETS_DIR": str(where),
           "CLIP_PRELOAD_LABEL_SETS": "cifar10,kitchen", "CLIP_DEVICE": "cpu"}
    baked = build_ahead(env, "--label-sets", "cifar10")
    assert baked.returncode == 0, baked.stderr
    assert "encoding 8 prompts for kitchen" in baked.stderr and "encoding 3 prompts for tools" in baked.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "embeddings").glob("*.npy")) == \
        ["cifar10", "kitchen", "tools"]
    with FunctionProcess("clip", tmp_path / "fn", env) as fn:
        described = requests.get(fn.url, timeout=30).json()["label_sets"]
        assert described["kitchen"] == {"labels": 4, "templates": 2, "source": "CLIP_LABEL_SETS_DIR/kitchen.txt",
                                        "ready": True}
        assert described["tools"]["source"] == "CLIP_LABEL_SETS_DIR/tools.txt" and not described["tools"]["ready"]
        assert described["cifar10"]["source"] == "built-in"
        answers = {name: requests.post(fn.url, data=noise_image("PNG"), params={"label_set": name, "top_k": 10},
                                       timeout=60) for name in ("kitchen", "tools")}
        assert requests.get(fn.url, timeout=30).json()["label_sets"]["tools"]["ready"]
        fn.output()  # flushed
        log = (fn.dir / "function.log").read_text()  # all of it, from the start
    for name, labels in (("kitchen", {"teapot", "coffee mug", "frying pan", "whisk"}),
                         ("tools", {"hammer", "saw", "t_square"})):
        assert answers[name].status_code == 200, answers[name].text
        answer = answers[name].json()
        assert answer["label_set"] == name and {p["label"] for p in answer["predictions"]} == labels
    assert "ready in" in log and "encoding" not in log, log  # every set came from the baked cache


def test_build_ahead_refuses_a_bad_file_in_one_line(clip_env, tmp_path):
    where = folder(tmp_path, {"kitchen.txt": "teapot\nteapot\n"})
    done = build_ahead({**clip_env, "CLIP_LABEL_SETS_DIR": str(where), "CLIP_DEVICE": "cpu"})
    assert done.returncode == 1
    assert done.stderr.strip() == f"build_ahead: {where}/kitchen.txt, line 2: 'teapot' repeats line 1"


def test_a_set_without_templates_ranks_as_its_labels_sent_with_the_request(tiny_model, clip_env, tmp_path,
                                                                           monkeypatch):
    """label_set=tools and labels=hammer,saw,t_square give the same scores: a file set without its own
    templates is prompted as custom labels are."""
    from clip import handler
    from support.inprocess import Event, service
    where = folder(tmp_path, {"tools.txt": "hammer\nsaw\nt_square\n"})
    file_sets = read(monkeypatch, where).file_sets
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], file_sets=file_sets)
    svc.labels.build("tools")  # as CLIP_PRELOAD_LABEL_SETS=tools would at start
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        image = noise_image("PNG", seed=3)
        by_set = handler.handle(Event(image, "image/png", query=[("label_set", "tools")]), None)
        by_labels = handler.handle(Event(image, "image/png", query=[("labels", "hammer,saw,t_square")]), None)
        unknown = handler.handle(Event(image, "image/png", query=[("label_set", "tool")]), None)
    finally:
        handler.SERVICE = previous
    assert by_set["statusCode"] == 200, by_set
    assert by_set["body"]["label_set"] == "tools" and by_labels["body"]["label_set"] == "custom"
    scores = [{p["label"]: p["score"] for p in answer["body"]["predictions"]} for answer in (by_set, by_labels)]
    assert scores[0].keys() == {"hammer", "saw", "t_square"}
    np.testing.assert_allclose([scores[0][k] for k in sorted(scores[0])], [scores[1][k] for k in sorted(scores[0])],
                               atol=1e-5)
    assert unknown["statusCode"] == 400 and "cifar100, cifar10, imagenet1k, tools" in \
        unknown["body"]["error"]["message"]


def test_a_set_from_a_file_is_listed_and_offered_on_the_page(clip_env, tmp_path):
    """Through the gateway, as scripts/serve runs both functions: clip lists the set with its source, the
    page offers it in a group of the function's own sets (the default still selected), and a no-JS form
    post with it classifies into its labels."""
    from support.servers import Stack
    where = folder(tmp_path, {"kitchen.txt": KITCHEN})
    env = {**clip_env, "CLIP_LABEL_SETS_DIR": str(where), "CLIP_PRELOAD_LABEL_SETS": "cifar100,kitchen"}
    with Stack(tmp_path / "stack", env) as stack:
        described = requests.get(stack.url + "/function/clip", timeout=30).json()
        page = requests.get(stack.url + "/function/index", timeout=30).text
        posted = requests.post(stack.url + "/function/index", files={"image": ("a.png", noise_image("PNG"))},
                               data={"label_set": "kitchen", "top_k": "2"}, headers={"Accept": "text/html"},
                               timeout=60)
    assert list(described["label_sets"]) == ["cifar100", "cifar10", "imagenet1k", "kitchen"]
    assert described["label_sets"]["kitchen"]["ready"] is True
    groups = dict(re.findall(r'<optgroup label="([^"]*)">(.*?)</optgroup>', page, re.S))
    assert list(groups) == ["Built in", "This function&#39;s"], page
    options = {group: re.findall(r'<option value="([^"]*)"( selected)?>', html) for group, html in groups.items()}
    assert options["Built in"] == [("cifar100", " selected"), ("cifar10", ""), ("imagenet1k", "")]
    assert options["This function&#39;s"] == [("kitchen", "")]
    assert posted.status_code == 200, posted.text
    shown = re.findall(r'class="label">([^<]*)<', posted.text)
    assert shown and set(shown) <= {"teapot", "coffee mug", "frying pan", "whisk"}, posted.text
