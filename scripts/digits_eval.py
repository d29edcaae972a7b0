"""FD, IS, precision and recall of digit samples against the real digits.

    python scripts/digits_eval.py samples_2000x8x8x1.npz [more.npz ...] [--reference ref.npz]

Features and class probabilities come from the small CNN shipped in
dkdm/assets/digits_classifier.pt (the digits' stand-in for Inception); the maths is
evaluations/metrics.py, the same as the ADM evaluator's. The reference defaults to all
1,797 real digits. For datasets other than digits use evaluations/evaluator.py.
"""

import argparse
import sys

from dkdm import digits_metric
from dkdm.data import DataError
from dkdm.data.arrays import read_images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", help="ADM npz files (arr_0 uint8 N x 8 x 8 x 1 or x 3)")
    p.add_argument("--reference", default="digits", help="'digits' (all real digits) or an npz")
    p.add_argument("--classifier", default=digits_metric.CLASSIFIER_PATH)
    args = p.parse_args()
    try:
        classifier = digits_metric.load_classifier(args.classifier)
        ref = digits_metric.activations(read_images(args.reference)[0], classifier)
        print(f"{'samples':<40} {'N':>6} {'FD':>9} {'IS':>7} {'precision':>10} {'recall':>7}")
        for path in args.samples:
            images = read_images(path)[0]
            m = digits_metric.score(digits_metric.activations(images, classifier), ref)
            print(
                f"{path:<40} {len(images):>6} {max(m['fd'], 0.0):>9.3f} {m['is']:>7.3f} {m['precision']:>10.4f} {m['recall']:>7.4f}"
            )
    except (DataError, ValueError, OSError) as e:
        print(f"digits_eval.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
