"""The embedded default model: data, the shipped pipeline folder and classifier, training determinism, sampling."""

from __future__ import annotations

import json

import pytest
import torch

from questdeploy.errors import ConfigError, ModelLoadError
from questdeploy.zoo import data
from questdeploy.zoo.classifier import (
    DEFAULT_CLASSIFIER_DIR,
    ClassifierConfig,
    DigitClassifier,
    load_default_classifier,
)
from questdeploy.zoo.embeddings import ClassEmbeddings
from questdeploy.zoo.pipeline import DEFAULT_PIPELINE_DIR, load_pipeline, save_pipeline
from questdeploy.zoo.sample import class_accuracy, sample_digits
from questdeploy.zoo.train_unet import UNetTrainConfig, main as train_unet_main, train_unet

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    num_attention_heads=2,
    norm_num_groups=4,
    cross_attention_dim=8,
    num_tokens=2,
    steps=2,
    batch_size=4,
    warmup_steps=1,
)


def _tiny_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(n) % 10


# --- data ---------------------------------------------------------------------------------------------------------


def test_split_shapes_range_and_stratification():
    split = data.split_digits()
    assert split.train_images.shape == (4500, 1, 16, 16)
    assert split.heldout_images.shape == (500, 1, 16, 16)
    assert split.train_images.dtype == torch.float32
    for x in (split.train_images, split.heldout_images):
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert float(x.min()) == -1.0  # background is exactly -1
    assert split.train_labels.bincount().tolist() == [450] * 10
    assert split.heldout_labels.bincount().tolist() == [50] * 10


def test_split_is_deterministic_and_disjoint():
    a, b = data.split_digits(seed=0), data.split_digits(seed=0)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.heldout_labels, b.heldout_labels)
    c = data.split_digits(seed=1)
    assert not torch.equal(a.heldout_images, c.heldout_images)
    # no held-out digit appears in the training part (compare exact images)
    train_keys = {t.numpy().tobytes() for t in a.train_images}
    assert sum(h.numpy().tobytes() in train_keys for h in a.heldout_images) <= 2  # MNIST has rare exact duplicates


def test_heldout_digits_matches_split():
    images, labels = data.heldout_digits()
    split = data.split_digits()
    assert torch.equal(images, split.heldout_images) and torch.equal(labels, split.heldout_labels)


def test_to_model_range_endpoints():
    x = torch.tensor([0.0, 255.0]).reshape(1, 1, 1, 2).expand(1, 1, 16, 2).contiguous()
    y = data.to_model_range(x.repeat(1, 1, 1, 8))
    assert y.shape == (1, 1, 16, 16)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0


def test_random_shift_is_seeded_translation():
    x = torch.full((3, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    a = data.random_shift(x, 2, torch.Generator().manual_seed(0))
    b = data.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert (a == 1.0).flatten(1).sum(1).tolist() == [1, 1, 1]  # the bright pixel moved, not duplicated or lost
    assert torch.equal(data.random_shift(x, 0, torch.Generator()), x)


# --- shipped pipeline folder ----------------------------------------------------------------------------------------


def test_shipped_pipeline_loads_with_diffusers():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    index = json.loads((DEFAULT_PIPELINE_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_PIPELINE_DIR / "unet")
    sched = DDIMScheduler.from_pretrained(DEFAULT_PIPELINE_DIR / "scheduler")
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    n_params = sum(p.numel() for p in unet.parameters())
    assert 1.5e6 <= n_params <= 2.5e6
    weights = DEFAULT_PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    names = [n for n, _ in unet.named_modules()]
    assert any(n.endswith("attn1") for n in names) and any(n.endswith("attn2") for n in names)  # self + cross


def test_shipped_class_embeddings_shape():
    from safetensors.torch import load_file

    from diffusers import UNet2DConditionModel

    folder = DEFAULT_PIPELINE_DIR / "class_embeddings"
    cfg = json.loads((folder / "config.json").read_text())
    table = load_file(str(folder / "class_embeddings.safetensors"))["embeddings"]
    assert cfg["num_classes"] == 10
    assert tuple(table.shape) == (cfg["num_classes"], cfg["num_tokens"], cfg["dim"])
    unet_cfg = UNet2DConditionModel.load_config(DEFAULT_PIPELINE_DIR / "unet")
    assert cfg["dim"] == unet_cfg["cross_attention_dim"]


def test_shipped_pipeline_forward_shape():
    pipe = load_pipeline()
    cond = pipe.encode(torch.tensor([3, 7]))
    with torch.no_grad():
        eps = pipe.unet(torch.randn(2, 1, 16, 16), 500, encoder_hidden_states=cond).sample
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()


# --- classifier -----------------------------------------------------------------------------------------------------


def test_default_classifier_is_accurate_on_heldout_digits():
    clf = load_default_classifier()
    images, labels = data.heldout_digits()
    assert clf.accuracy(images, labels) >= 0.95
    with torch.no_grad():
        feats = clf.features(images[:8])
    assert feats.shape == (8, clf.config.feature_dim)


def test_classifier_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval()
    model.save(tmp_path / "clf")
    model.save(tmp_path / "clf")  # overwriting an existing folder works
    loaded = DigitClassifier.load(tmp_path / "clf")
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["clf"]  # no temp folders left behind
    assert DEFAULT_CLASSIFIER_DIR.name == "digit-classifier"


# --- training and sampling ------------------------------------------------------------------------------------------


def test_tiny_training_is_deterministic():
    images, labels = _tiny_data()
    cfg = UNetTrainConfig(**TINY)
    a = train_unet(cfg, images, labels, progress=False)
    b = train_unet(cfg, images, labels, progress=False)
    assert len(a.losses) == 2 and a.losses == b.losses
    for (na, pa), (_, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(pa, pb), na
    c = train_unet(UNetTrainConfig(**{**TINY, "seed": 1}), images, labels, progress=False)
    assert c.losses != a.losses


def test_config_validation_message():
    with pytest.raises(ConfigError, match="same length"):
        UNetTrainConfig(block_out_channels=(8, 16, 32), down_block_types=("DownBlock2D",))


def test_pipeline_roundtrip_and_sampling(tmp_path):
    images, labels = _tiny_data()
    result = train_unet(UNetTrainConfig(**TINY), images, labels, progress=False)
    out = save_pipeline(tmp_path / "pipe", result.unet, result.scheduler, result.class_embeddings)
    assert sorted(p.name for p in out.iterdir()) == ["class_embeddings", "model_index.json", "scheduler", "unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    pipe = load_pipeline(out)
    assert torch.equal(pipe.class_embeddings.embeddings, result.class_embeddings.embeddings)
    a = sample_digits(pipe, [0, 1, 2], steps=2, seed=3)
    b = sample_digits(out, [0, 1, 2], steps=2, seed=3, batch_size=2)
    assert a.shape == (3, 1, 16, 16) and float(a.abs().max()) <= 1.0
    assert torch.allclose(a, b, atol=1e-5)


def test_class_embeddings_reject_bad_labels():
    emb = ClassEmbeddings(10, 2, 8)
    assert emb(torch.tensor([0, 9])).shape == (2, 2, 8)
    with pytest.raises(ConfigError, match="class labels"):
        emb(torch.tensor([10]))


def test_load_pipeline_missing_folder_teaches(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_pipeline(tmp_path)
    assert "train_unet" in exc.value.hint


def test_train_unet_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        train_unet_main(["--help"])
    assert exc.value.code == 0
    assert "--steps" in capsys.readouterr().out


@pytest.mark.slow
def test_shipped_model_samples_are_recognisable():
    labels = torch.arange(10).repeat_interleave(20)
    images = sample_digits(None, labels, steps=25, seed=1234)
    acc, per_class = class_accuracy(images, labels)
    assert acc >= 0.9, per_class.tolist()
