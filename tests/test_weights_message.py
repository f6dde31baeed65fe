"""Weights that can be neither found nor downloaded: clip's description, every 503 and the page's banner
say "the weights cache" and the setting to change (CLIP_CACHE_DIR), never the server's path; the path
goes to the operator's log only."""
import requests
from support.images import noise_image
from support.servers import FunctionProcess, wait_until


def test_no_answer_shows_the_weights_cache_path(tmp_path):
    cache = tmp_path / "server-only" / "cache"
    env = {"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": "laion2b_s34b_b79k", "CLIP_CACHE_DIR": str(cache),
           "HF_HUB_OFFLINE": "1"}  # offline: the download fails at once, as on an air-gapped machine
    clip = FunctionProcess("clip", tmp_path / "clip", env).start(wait_ready=False)
    try:
        def described():
            try:
                return requests.get(clip.url, timeout=5).json()
            except (requests.RequestException, ValueError):
                return {}
        wait_until(lambda: "error" in described(), 300, 0.5, "clip to say why it is not ready")
        description = requests.get(clip.url, timeout=5).text
        refused = requests.post(clip.url, data=noise_image("PNG"), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        message = refused.json()["error"]["message"]
        assert "the weights cache (CLIP_CACHE_DIR)" in message and "CLIP_PRETRAINED=none" in message
        for shown in (description, refused.text):
            assert "server-only" not in shown and str(tmp_path) not in shown, shown
        assert str(cache / "weights") in clip.output(), "the operator's log names the path"

        with FunctionProcess("index", tmp_path / "index", {"CLIP_URL": clip.url + "/"}) as index:
            def page():
                return requests.get(index.url, headers={"Accept": "text/html"}, timeout=30).text
            wait_until(lambda: "The classifier cannot start" in page(), 60, 0.5, "the page's banner")
            banner = page()
            assert "the weights cache (CLIP_CACHE_DIR)" in banner
            assert "server-only" not in banner and str(tmp_path) not in banner
    finally:
        clip.stop()
