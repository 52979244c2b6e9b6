"""Loading the diffusion model a run starts from.

``--model`` takes a local diffusers folder: a ``UNet2DModel`` / ``UNet2DConditionModel`` folder, or a
pipeline folder whose ``unet/`` and ``scheduler/`` are used. With no ``--model`` the project's own
embedded digits model is used. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

DEFAULT_MODEL_DIR = Path(__file__).parent / "zoo" / "weights" / "digits"
SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class Conditioner:
    """Produces ``encoder_hidden_states`` for a batch of condition labels (None for unconditional UNets)."""

    num_classes: int = 0

    def __call__(self, labels: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - interface
        raise NotImplementedError


class NoConditioner(Conditioner):
    def __call__(self, labels):
        return None


class ClassEmbeddingConditioner(Conditioner):
    """Learned class-label token table: the "text encoder" of the embedded digits model."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings  # (num_classes, tokens, dim)
        self.num_classes = embeddings.shape[0]

    def __call__(self, labels):
        return self.embeddings[labels.long() % self.num_classes]


class RandomContextConditioner(Conditioner):
    """Fallback for conditional UNets shipped without an encoder we can run: fixed Gaussian contexts.

    Calibrating on random context is weaker than on real prompts; pass ``--conditioning FILE`` with
    precomputed ``encoder_hidden_states`` for better scales.
    """

    def __init__(self, tokens: int, dim: int, num_classes: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.embeddings = torch.randn(num_classes, tokens, dim, generator=g)
        self.num_classes = num_classes

    def __call__(self, labels):
        return self.embeddings[labels.long() % self.num_classes]


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    scheduler_config: dict
    conditioner: Conditioner
    path: str
    model_id: str
    kind: str
    is_default: bool

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def conditional(self) -> bool:
        return self.kind == "UNet2DConditionModel"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}.", hint="check the diffusers folder is complete.") from None


def _find_unet_dir(root: Path) -> tuple[Path, Path | None]:
    """Return (unet folder, pipeline folder or None)."""
    cfg = root / "config.json"
    if cfg.is_file() and _read_json(cfg).get("_class_name") in SUPPORTED_UNETS:
        return root, None
    if (root / "model_index.json").is_file() or (root / "unet").is_dir():
        unet = root / "unet"
        if not (unet / "config.json").is_file():
            raise ModelLoadError(
                f"pipeline folder {root} has no unet/config.json.",
                hint="pass a diffusers pipeline folder with a unet/ subfolder, or the UNet folder itself.",
            )
        return unet, root
    if cfg.is_file():
        name = _read_json(cfg).get("_class_name")
        raise ModelLoadError(
            f"{root} holds a {name!r}, not one of {', '.join(SUPPORTED_UNETS)}.",
            hint="pass a diffusers UNet2DModel / UNet2DConditionModel folder or a pipeline folder.",
        )
    raise ModelLoadError(
        f"{root} is not a diffusers model folder (no config.json or model_index.json).",
        hint="pass a folder written by diffusers' save_pretrained (a UNet or a whole pipeline).",
    )


def _check_config_keys(cls, unet_dir: Path) -> None:
    """diffusers silently ignores config keys it does not know; a typo there changes the model, so refuse."""
    import inspect

    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    cfg = _read_json(unet_dir / "config.json")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        raise ModelLoadError(
            f"{unet_dir / 'config.json'} has keys {cls.__name__} does not know: {', '.join(unknown)}.",
            hint="fix the typo, or upgrade diffusers if the model was saved by a newer version.",
        )


def model_fingerprint(unet_dir: Path) -> str:
    """Content hash of the UNet config and weights: ties a run folder to exactly one model."""
    h = hashlib.sha256()
    h.update((unet_dir / "config.json").read_bytes())
    for name in _WEIGHT_FILES:
        p = unet_dir / name
        if p.is_file():
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            break
    return h.hexdigest()


def _scheduler_config(pipeline_dir: Path | None, unet_dir: Path) -> dict:
    for cand in ([pipeline_dir / "scheduler"] if pipeline_dir else []) + [unet_dir / "scheduler", unet_dir.parent / "scheduler"]:
        f = cand / "scheduler_config.json"
        if f.is_file():
            return _read_json(f)
    # Diffusers' DDPM defaults; said in the run manifest so the user sees what was assumed.
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "_assumed": True}


def _load_conditioner(kind: str, unet, pipeline_dir: Path | None, conditioning: Path | None) -> Conditioner:
    if kind != "UNet2DConditionModel":
        return NoConditioner()
    if conditioning is not None:
        from safetensors.torch import load_file

        try:
            emb = load_file(str(conditioning))["encoder_hidden_states"]
        except Exception as e:  # noqa: BLE001 - any failure here is the user's file
            raise ModelLoadError(
                f"cannot read conditioning file {conditioning}: {e}.",
                hint="give a safetensors file with key 'encoder_hidden_states' of shape (N, tokens, dim).",
            ) from None
        return ClassEmbeddingConditioner(emb.float())
    if pipeline_dir is not None and (pipeline_dir / "class_embeddings").is_dir():
        from safetensors.torch import load_file

        emb = load_file(str(pipeline_dir / "class_embeddings" / "class_embeddings.safetensors"))["embeddings"]
        return ClassEmbeddingConditioner(emb.float())
    dim = unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    return RandomContextConditioner(tokens=8, dim=int(dim))


def load_model(model: str | Path | None = None, conditioning: str | Path | None = None) -> LoadedModel:
    """Load the UNet (FP32, eval mode) and what sampling it needs; never touches the network."""
    import diffusers

    is_default = model is None
    root = DEFAULT_MODEL_DIR if is_default else Path(model).expanduser()
    if not root.exists():
        if is_default:
            raise ModelLoadError(
                f"the embedded default model is missing at {root}.",
                hint="reinstall questdeploy, or train it: python -m questdeploy.zoo.train_unet (see zoo/weights/README.md).",
            )
        if _HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")):
            raise ModelLoadError(
                f"{model!r} looks like a model hub id; questdeploy never downloads models.",
                hint=f"download it first (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass --model DIR.",
            )
        raise ModelLoadError(f"model folder {root} does not exist.", hint="pass --model a local diffusers folder.")
    if not root.is_dir():
        raise ModelLoadError(f"{root} is a file, not a diffusers folder.", hint="pass the folder that holds config.json.")
    unet_dir, pipeline_dir = _find_unet_dir(root)
    kind = _read_json(unet_dir / "config.json").get("_class_name")
    if not any((unet_dir / n).is_file() for n in _WEIGHT_FILES):
        raise ModelLoadError(
            f"{unet_dir} has a config.json but no weights ({' or '.join(_WEIGHT_FILES)}).",
            hint="copy the weight file next to config.json (save_pretrained writes both).",
        )
    cls = getattr(diffusers, kind)
    _check_config_keys(cls, unet_dir)
    try:
        unet = cls.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"diffusers could not load {unet_dir}: {msg}", hint="check config.json and the weight file are intact.") from None
    unet = unet.float().eval().requires_grad_(False)
    bad = next((n for n, p in unet.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ModelLoadError(f"{unet_dir} has NaN/Inf in weight '{bad}'.",
                             hint="the checkpoint is corrupt or was saved after a diverged training step; use a good one.")
    return LoadedModel(
        unet=unet,
        scheduler_config=_scheduler_config(pipeline_dir, unet_dir),
        conditioner=_load_conditioner(kind, unet, pipeline_dir, Path(conditioning) if conditioning else None),
        path="<default>" if is_default else str(root.resolve()),
        model_id=model_fingerprint(unet_dir),
        kind=kind,
        is_default=is_default,
    )
