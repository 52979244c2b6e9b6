"""The "text encoder" of the digit model: a learned table mapping a class label to T cross-attention tokens.

Stored as a folder: `config.json` {"num_classes", "num_tokens", "dim"} + `class_embeddings.safetensors`
(one tensor, key `embeddings`, shape (num_classes, num_tokens, dim)).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from questdeploy.errors import ConfigError, DataError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "class_embeddings.safetensors"
TENSOR_KEY = "embeddings"


class ClassEmbeddings(nn.Module):
    """labels (B,) int -> encoder_hidden_states (B, num_tokens, dim)."""

    def __init__(self, num_classes: int = 10, num_tokens: int = 4, dim: int = 64, init_std: float = 0.5) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)
        self.embeddings = nn.Parameter(torch.randn(self.num_classes, self.num_tokens, self.dim) * init_std)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embeddings.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(f"class labels must lie in [0, {self.num_classes}), got {labels.tolist()}.")
        return self.embeddings[labels]

    def config(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "num_tokens": self.num_tokens, "dim": self.dim}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the folder (not atomic on its own: the pipeline writer wraps the whole pipeline in a temp folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")
        save_file({TENSOR_KEY: self.embeddings.detach().contiguous()}, str(folder / WEIGHTS_NAME), {"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ClassEmbeddings":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        module = cls(cfg["num_classes"], cfg["num_tokens"], cfg["dim"])
        table = load_file(str(folder / WEIGHTS_NAME))[TENSOR_KEY]
        expected = (module.num_classes, module.num_tokens, module.dim)
        if tuple(table.shape) != expected:
            raise DataError(f"{folder / WEIGHTS_NAME}: embeddings shape {tuple(table.shape)} != config {expected}.")
        with torch.no_grad():
            module.embeddings.copy_(table)
        return module
