"""Train the small first stage of the latent digits path: a diffusers AutoencoderKL, 8x8x1 -> 4x4x2.

    python scripts/train_digits_autoencoder.py     # writes dkdm/assets/digits_autoencoder/ + .json

Reconstruction (MSE) plus a small KL term on all 1,797 digits; the scale factor is then set as
LDM's scale-by-std does (1 / std of the encoded means), so the latents a diffusion model sees have
unit variance. The .json beside the folder records the command, the settings and the final errors.
"""

import argparse
import json
import os
import sys
import time

import torch

from dkdm.data import load_digits
from dkdm.fileio import atomic_write
from dkdm.resolve import ASSETS

OUTPUT = os.path.join(ASSETS, "digits_autoencoder")
CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 2,
    "norm_num_groups": 8,
    "sample_size": 8,
}


def main() -> int:
    from diffusers import AutoencoderKL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=OUTPUT)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, _ = load_digits()
    ae = AutoencoderKL(**CONFIG)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.time()
    for step in range(args.steps):
        b = x[torch.randint(0, len(x), (args.batch_size,), generator=gen)]
        post = ae.encode(b).latent_dist
        rec = ae.decode(post.sample()).sample
        mse = torch.mean((rec - b) ** 2)
        kl = post.kl().mean() / b[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step}: mse {mse.item():.5f} kl/dim {kl.item():.3f}", flush=True)
    ae.eval()
    with torch.no_grad():
        post = ae.encode(x).latent_dist
        scale = 1.0 / post.mean.std().item()
        mse_mode = torch.mean((ae.decode(post.mode()).sample.clamp(-1, 1) - x) ** 2).item()
        mse_sample = torch.mean((ae.decode(post.sample()).sample.clamp(-1, 1) - x) ** 2).item()
    ae.register_to_config(scaling_factor=scale)
    ae.save_pretrained(args.output)
    info = {
        "description": "A diffusers AutoencoderKL trained on scikit-learn's 1,797 digits (8x8x1 in [-1, 1]) "
        "-> 4x4x2 latents; the first stage of the latent digits path",
        "command": "python " + " ".join(["scripts/train_digits_autoencoder.py", *sys.argv[1:]]),
        "config": CONFIG,
        "settings": vars(args) | {"output": os.path.relpath(args.output, ASSETS)},
        "scaling_factor": scale,
        "reconstruction_mse_mode": mse_mode,
        "reconstruction_mse_sample": mse_sample,
        "parameters": sum(p.numel() for p in ae.parameters()),
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(args.output.rstrip("/") + ".json", lambda f: f.write(text), mode="w")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
