"""Model loading: local diffusers folders in, clear one-line errors for everything else."""

import json

import pytest

from questdeploy.errors import ModelLoadError
from questdeploy.models import ClassEmbeddingConditioner, NoConditioner, load_model


def test_pipeline_folder_loads(tiny_cond_pipeline):
    m = load_model(tiny_cond_pipeline)
    assert m.kind == "UNet2DConditionModel"
    assert m.sample_shape == (1, 8, 8)
    assert isinstance(m.conditioner, ClassEmbeddingConditioner)
    assert m.scheduler_config["_class_name"] == "DDIMScheduler"
    assert m.conditioner(__import__("torch").tensor([0, 3])).shape == (2, 2, 16)


def test_unet_folder_itself_loads(tiny_cond_pipeline, tiny_uncond_unet):
    assert load_model(tiny_cond_pipeline / "unet").kind == "UNet2DConditionModel"
    m = load_model(tiny_uncond_unet)
    assert m.kind == "UNet2DModel" and isinstance(m.conditioner, NoConditioner)
    assert m.scheduler_config.get("_assumed") is True


def test_model_id_depends_on_weights(tiny_cond_pipeline, tiny_uncond_unet):
    assert load_model(tiny_cond_pipeline).model_id != load_model(tiny_uncond_unet).model_id
    assert load_model(tiny_cond_pipeline).model_id == load_model(tiny_cond_pipeline / "unet").model_id


@pytest.mark.parametrize("arg,match", [
    ("runwayml/stable-diffusion-v1-5", "hub id"),
    ("/nonexistent/folder", "does not exist"),
])
def test_bad_model_argument(arg, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(arg)


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelLoadError, match="AutoencoderKL"):
        load_model(tmp_path)


def test_pipeline_without_unet(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no unet/config.json"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path, tiny_uncond_unet):
    (tmp_path / "config.json").write_text((tiny_uncond_unet / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


def test_corrupt_weights(tmp_path, tiny_uncond_unet):
    (tmp_path / "config.json").write_text((tiny_uncond_unet / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tmp_path)
