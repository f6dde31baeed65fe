#!/bin/sh
# clip's build-ahead step, run by the template's Dockerfile at image build (as the app user, in
# /home/app, with the stack's BUILD_ENV in the environment; arguments: BUILD_HOOK_ARGS, such as
# "--label-sets cifar100,cifar10"). It downloads the weights and caches the label-set embeddings,
# so a cold start downloads and embeds nothing; from then on the Hugging Face hub is read from the
# cache only.
set -eu
CLIP_DEVICE=cpu python -m function.build_ahead "$@"
echo "HF_HUB_OFFLINE=1" >> function.env
echo "HF_HUB_DISABLE_TELEMETRY=1" >> function.env
