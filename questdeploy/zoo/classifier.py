"""A small CNN digit classifier on 16x16 images in [-1, 1]: the judge of sample quality and the FID-proxy features.

`DigitClassifier.features(x)` is the penultimate layer (after ReLU); `forward(x)` returns logits. A classifier is
stored as a folder with `config.json` and `model.safetensors`, like a diffusers model, so it loads without the code
that trained it changing.
"""

from __future__ import annotations

from ..runfolder import atomic_dir

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from questdeploy.errors import ConfigError, ModelLoadError
from questdeploy.zoo.data import NUM_CLASSES, IMAGE_SIZE, random_shift, split_digits

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CLASSIFIER_DIR = WEIGHTS_DIR / "digit-classifier"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the classifier: two conv stages (two 3x3 convs + 2x2 max-pool each), then a hidden linear layer."""

    image_size: int = IMAGE_SIZE
    num_classes: int = NUM_CLASSES
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if self.image_size % 4:
            raise ConfigError(f"image_size must be divisible by 4 (two 2x2 poolings), got {self.image_size}.")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 2:
            raise ConfigError(f"channels must list 2 widths, got {self.channels}.", hint="e.g. channels=(32, 64).")


class DigitClassifier(nn.Module):
    """conv-conv-pool, conv-conv-pool, linear (features), linear (logits)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2 = self.config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = self.config.image_size // 4
        self.hidden = nn.Linear(c2 * side * side, self.config.feature_dim)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim), the FID-proxy feature space. x: (B, 1, H, W) in [-1, 1]."""
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted labels (B,) in eval mode (the module's training flag is restored afterwards)."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was_training)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of `x` classified as `labels`."""
        return float((self.predict(x) == labels).float().mean())

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` to `folder` atomically (temp folder, then rename)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            _make_readable(tmp)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "DigitClassifier":
        """Load a classifier folder written by `save`; returned in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = ClassifierConfig(**json.loads((folder / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(map_location)))
        return model.eval()


def load_default_classifier(map_location: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped classifier (`questdeploy/zoo/weights/digit-classifier/`), in eval mode."""
    if not (DEFAULT_CLASSIFIER_DIR / WEIGHTS_NAME).is_file():
        raise ModelLoadError(
            f"No classifier weights in {DEFAULT_CLASSIFIER_DIR}.",
            hint="reinstall questdeploy, or train them: python -m questdeploy.zoo.train_classifier "
            "(see questdeploy/zoo/weights/README.md).",
        )
    return DigitClassifier.load(DEFAULT_CLASSIFIER_DIR, map_location)


@dataclass(frozen=True)
class ClassifierTrainResult:
    model: DigitClassifier
    heldout_accuracy: float
    final_loss: float
    seconds: float


def train_classifier(
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 1,
    seed: int = 0,
    split_seed: int = 0,
    config: ClassifierConfig | None = None,
    progress: bool = True,
) -> ClassifierTrainResult:
    """Train on the 4500 training digits with random shifts of up to `max_shift` pixels; AdamW + one-cycle schedule.

    Deterministic for a given seed on one machine (seeded init, shuffling and augmentation).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    split = split_digits(seed=split_seed)
    model = DigitClassifier(config)
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(split.train_images)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(epochs), desc="classifier", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = random_shift(split.train_images[idx], max_shift, gen)
            loss = F.cross_entropy(model(x), split.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss)
        acc = model.accuracy(split.heldout_images, split.heldout_labels)
        bar.set_postfix(loss=f"{loss_value:.4f}", heldout=f"{acc:.3f}")
    model.eval()
    return ClassifierTrainResult(
        model=model,
        heldout_accuracy=model.accuracy(split.heldout_images, split.heldout_labels),
        final_loss=loss_value,
        seconds=time.perf_counter() - start,
    )


def _make_readable(folder: Path) -> None:
    """Some writers create private (0600) files; shipped weights should be plain readable files."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
