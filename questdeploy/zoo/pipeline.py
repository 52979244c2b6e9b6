"""Read and write the digit model's pipeline folder (layout fixed in docs/design.md, "Default model").

    model_index.json
    unet/               UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    scheduler/          DDIMScheduler (scheduler_config.json)
    class_embeddings/   config.json + class_embeddings.safetensors (key `embeddings`, (num_classes, T, D))
"""

from __future__ import annotations

from ..runfolder import atomic_dir

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from questdeploy.errors import ModelLoadError
from questdeploy.zoo.embeddings import ClassEmbeddings

DEFAULT_PIPELINE_DIR = Path(__file__).resolve().parent / "weights" / "digits"
PIPELINE_CLASS_NAME = "QuestDigitsPipeline"


@dataclass
class DigitPipeline:
    """The three parts of the digit model, loaded and in eval mode."""

    unet: "torch.nn.Module"  # diffusers.UNet2DConditionModel
    scheduler: object  # diffusers.DDIMScheduler
    class_embeddings: ClassEmbeddings

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> encoder_hidden_states (B, T, D)."""
        return self.class_embeddings(labels)


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS_NAME,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "class_embeddings": ["questdeploy.zoo.embeddings", "ClassEmbeddings"],
    }


def save_pipeline(folder: str | os.PathLike, unet, scheduler, class_embeddings: ClassEmbeddings) -> Path:
    """Write the pipeline folder atomically: everything goes to a temp folder beside it, which is then renamed."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        class_embeddings.save_pretrained(tmp / "class_embeddings")
        _make_readable(tmp)
    return folder


def load_pipeline(folder: str | os.PathLike | None = None) -> DigitPipeline:
    """Load a pipeline folder (default: the shipped `questdeploy/zoo/weights/digits/`) on CPU, in eval mode."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = Path(folder) if folder is not None else DEFAULT_PIPELINE_DIR
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a digit pipeline folder (no model_index.json).",
            hint="pass the folder written by python -m questdeploy.zoo.train_unet "
            "(see questdeploy/zoo/weights/README.md).",
        )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    embeddings = ClassEmbeddings.from_pretrained(folder / "class_embeddings").eval()
    return DigitPipeline(unet=unet, scheduler=scheduler, class_embeddings=embeddings)


def _make_readable(folder: Path) -> None:
    """Some writers create private (0600) files; shipped weights should be plain readable files."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
