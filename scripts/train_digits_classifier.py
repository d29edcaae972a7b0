"""Train the small CNN that scores digit samples (features for FD / precision / recall, IS).

    python scripts/train_digits_classifier.py            # writes dkdm/assets/digits_classifier.pt + .json

Trains on 80% of the real digits (a fixed split, recorded in the .json) after the same
uint8 round trip samples go through, and reports accuracy on the other 20%.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from dkdm.digits_metric import (
    CLASSIFIER_PATH,
    DigitsClassifier,
    real_digits,
    save_classifier,
    split_indices,
    to_input,
)


def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One-pixel shifts and a little noise, so the features tolerate imperfect samples."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # background is -1
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    x = padded[:, :, dy : dy + 8, dx : dx + 8]
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=CLASSIFIER_PATH)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = real_digits()
    train_idx, test_idx = split_indices(len(images), 0.2, seed=args.seed)
    x, y = to_input(images), torch.from_numpy(labels)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm), args.batch_size):
            b = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(jitter(x[b], gen)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = {
            name: float((model(x[idx]).argmax(1) == y[idx]).double().mean())
            for name, idx in (("train", train_idx), ("test", test_idx))
        }
    print(
        f"{args.epochs} epochs in {time.time() - start:.0f}s: train accuracy {acc['train']:.4f}, "
        f"held-out accuracy {acc['test']:.4f} ({len(test_idx)} digits)"
    )
    provenance = {
        "command": " ".join(["python", "scripts/train_digits_classifier.py"] + sys.argv[1:]),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "split": {"test_fraction": 0.2, "seed": args.seed, "train": len(train_idx), "test": len(test_idx)},
        "train_accuracy": round(acc["train"], 4),
        "test_accuracy": round(acc["test"], 4),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": model.config,
        "input": "uint8 NHWC 8x8x1 digits mapped to [-1, 1]; features = ReLU(fc1), the penultimate layer",
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_classifier(model, args.output, provenance)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
