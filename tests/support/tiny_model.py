"""A tiny open_clip model directory (config + random weights) in open_clip's own save format,
loaded by the function through CLIP_MODEL=local-dir:… exactly as a downloaded model would be."""
import sys
from pathlib import Path

import open_clip
import safetensors.torch
import torch
from open_clip.push_to_hf_hub import save_config_for_hf

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_model(directory, seed=1234):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CONFIG)
    model.visual.image_mean = open_clip.OPENAI_DATASET_MEAN  # as create_model() sets them
    model.visual.image_std = open_clip.OPENAI_DATASET_STD
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))  # a trained model's scale
    safetensors.torch.save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    save_config_for_hf(model, directory / "open_clip_config.json", model_config=TINY_CONFIG)
    return directory


if __name__ == "__main__":
    print(make_tiny_model(sys.argv[1]))
