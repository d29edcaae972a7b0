"""Make a data-limited training set: P% real images mixed into a teacher's synthetic set.

    python scripts/mix_dataset.py --real digits --synthetic synth.npz --real_fraction 0.2 --output mix20.npz

The mix has exactly as many images as the synthetic set (the paper's data-limited
baseline, section 4.1): round(P * N) real images drawn without replacement, the rest
synthetic images drawn without replacement, shuffled together. Labels (arr_1) are kept
only when both sets have them. The same --seed gives the same file.
"""

import argparse
import sys

import numpy as np

from dkdm.data import DataError
from dkdm.data.arrays import read_images, save_npz

Array = np.ndarray


def mix(
    real: tuple[Array, Array | None], synthetic: tuple[Array, Array | None], real_fraction: float, seed: int
) -> tuple[Array, Array | None, int]:
    """Return (images, labels or None, number of real images) for the P% mix."""
    (xr, yr), (xs, ys) = real, synthetic
    if not 0.0 <= real_fraction <= 1.0:
        raise DataError(f"--real_fraction must lie in [0, 1], got {real_fraction}")
    if xr.shape[1:] != xs.shape[1:]:
        raise DataError(
            f"real images are {xr.shape[1:]} but synthetic ones {xs.shape[1:]} (H, W, C); "
            "make the real set at the same size (e.g. make_reference.py --image_size)"
        )
    n = len(xs)
    n_real = int(np.floor(real_fraction * n + 0.5))
    if n_real > len(xr):
        raise DataError(f"{real_fraction:.0%} of {n} is {n_real} real images, but the real set has only {len(xr)}")
    rng = np.random.default_rng(seed)
    ri = np.sort(rng.choice(len(xr), n_real, replace=False))
    si = np.sort(rng.choice(n, n - n_real, replace=False))
    order = rng.permutation(n)
    images = np.concatenate([xr[ri], xs[si]])[order]
    labels = None
    if yr is not None and ys is not None:
        labels = np.concatenate([yr[ri], ys[si]]).astype(np.int64)[order]
    return images, labels, n_real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="'digits', an .npz, a CIFAR-10 python folder or an image folder")
    p.add_argument("--synthetic", required=True, help="the teacher's samples (.npz from scripts/sample.py)")
    p.add_argument("--real_fraction", type=float, required=True, help="P: share of real images, e.g. 0.2")
    p.add_argument("--output", required=True, help="the mixed .npz to write")
    p.add_argument("--split", default="train", help="CIFAR-10 split of --real")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        synthetic = read_images(args.synthetic)
        real = read_images(args.real, image_size=synthetic[0].shape[1], split=args.split)
        images, labels, n_real = mix(real, synthetic, args.real_fraction, args.seed)
        save_npz(args.output, images, labels)
    except (DataError, OSError) as e:
        print(f"mix_dataset.py: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: {len(images)} images ({n_real} real, {len(images) - n_real} synthetic), "
        f"{'with' if labels is not None else 'without'} labels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
