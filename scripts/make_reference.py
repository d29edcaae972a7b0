"""Turn a dataset into the evaluator's reference batch (an ADM npz: arr_0 uint8 N x H x W x C).

    python scripts/make_reference.py --source ~/data/cifar-10-batches-py --output cifar10_train_ref.npz
    python scripts/make_reference.py --source ~/data/celeba_images --image_size 64 --output celeba64_ref.npz
    python scripts/make_reference.py --source digits --output digits_ref.npz

--source is an image folder (read recursively, resized and centre-cropped as ADM does
when --image_size is given), an .npz with arr_0, CIFAR-10's python pickles (the
cifar-10-batches-py folder or cifar-10-python.tar.gz; --split train|test), or 'digits'.
The paper compares against the full training set; --num draws a random subset (--seed).
Nothing is downloaded.
"""

import argparse
import os
import sys

import numpy as np

from dkdm.data import DataError
from dkdm.data.arrays import read_images, save_npz


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--output", required=True, help="the reference .npz to write")
    p.add_argument("--image_size", type=int, default=0, help="resize + centre-crop to this size (0: keep)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="CIFAR-10 split")
    p.add_argument("--num", type=int, default=0, help="keep a random subset of this many images (0: all)")
    p.add_argument("--labels", action="store_true", help="also store labels as arr_1 (folder: file-name prefix)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        images, labels = read_images(args.source, args.image_size or None, args.split, class_labels=args.labels)
        if args.num:
            if args.num > len(images):
                raise DataError(f"--num {args.num} exceeds the {len(images)} images in {args.source}")
            keep = np.sort(np.random.default_rng(args.seed).choice(len(images), args.num, replace=False))
            images, labels = images[keep], (labels[keep] if labels is not None else None)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_npz(args.output, np.ascontiguousarray(images), labels if args.labels else None)
    except (DataError, OSError) as e:
        print(f"make_reference.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: arr_0 {images.dtype} {list(images.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
