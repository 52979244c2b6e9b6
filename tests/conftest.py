"""Shared fixtures: tiny diffusers model folders written to disk, as a user would pass them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Tiny test models gain nothing from intra-op threads; one thread avoids oversubscribing 2-core CI.
torch.set_num_threads(1)


def make_tiny_cond_pipeline(root: Path, seed: int = 0) -> Path:
    """A pipeline folder (unet/, scheduler/, class_embeddings/) shaped like the embedded default model."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8,
    )
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    (root / "class_embeddings").mkdir()
    save_file({"embeddings": torch.randn(10, 2, 16)}, str(root / "class_embeddings" / "class_embeddings.safetensors"))
    (root / "class_embeddings" / "config.json").write_text(json.dumps({"num_classes": 10, "num_tokens": 2, "dim": 16}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QuestDigitsPipeline"}))
    return root


def make_tiny_uncond_unet(root: Path, seed: int = 0) -> Path:
    """A bare UNet2DModel folder with an attention block (no scheduler: DDPM defaults are assumed)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    unet.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_cond_pipeline(tmp_path_factory) -> Path:
    return make_tiny_cond_pipeline(tmp_path_factory.mktemp("models") / "tiny-cond")


@pytest.fixture(scope="session")
def tiny_uncond_unet(tmp_path_factory) -> Path:
    return make_tiny_uncond_unet(tmp_path_factory.mktemp("models") / "tiny-uncond")
