"""Whether clip can reach the model hub, asked once by scripts/serve before it starts clip.

Without internet access huggingface_hub retries every weight file it looks for (about a minute of
warnings) before open_clip gives up; told HF_HUB_OFFLINE=1 it answers from its cache at once. So a
machine that cannot reach the hub starts clip offline: cached weights load at once, missing ones give
clip's one clear message (the two ways out) within seconds."""

import logging

import requests

LOG = logging.getLogger("gateway")

TIMEOUT_S = 5


def needs_hub(env: dict) -> bool:
    """Whether clip's settings name weights open_clip would look for on the hub."""
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    untrained = env.get("CLIP_PRETRAINED", "").strip().lower() == "none"
    local = env.get("CLIP_MODEL", "").startswith("local-dir:")
    return not (offline or untrained or local)


def unreachable(env: dict) -> str | None:
    """Why the hub cannot be reached (one HEAD request, proxies as the environment sets them), or None."""
    endpoint = env.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        requests.head(endpoint, timeout=TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        return f"{endpoint} is not reachable ({type(exc).__name__})"
    return None


def offline_if_unreachable(env: dict) -> dict:
    """clip's environment, with HF_HUB_OFFLINE=1 added when it needs the hub and cannot reach it."""
    why = unreachable(env) if needs_hub(env) else None
    if why is None:
        return env
    LOG.warning("%s: clip starts offline (HF_HUB_OFFLINE=1), with the weights in its cache only", why)
    return {**env, "HF_HUB_OFFLINE": "1"}
