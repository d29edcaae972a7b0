"""FD, IS, precision and recall of digit samples against the real digits.

    python scripts/digits_eval.py samples_2000x8x8x1.npz [more.npz ...] [--reference ref.npz]

Features and class probabilities come from the small CNN shipped in
dkdm/assets/digits_classifier.pt (the digits' stand-in for Inception); the maths is
evaluations/metrics.py, the same as the ADM evaluator's. The reference defaults to all
1,797 real digits. Class-conditional samples (labels in arr_1) also get the accuracy of the
requested label ("label acc"). ``--json out.json`` also writes the numbers, one record per
file, for scripts to read. For datasets other than digits use evaluations/evaluator.py.
"""

import argparse
import json
import sys

from dkdm import digits_metric
from dkdm.data import DataError
from dkdm.data.arrays import read_images
from dkdm.fileio import atomic_write


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", help="ADM npz files (arr_0 uint8 N x 8 x 8 x 1 or x 3)")
    p.add_argument("--reference", default="digits", help="'digits' (all real digits) or an npz")
    p.add_argument("--classifier", default=digits_metric.CLASSIFIER_PATH)
    p.add_argument("--json", default="", help="also write the numbers here (a list, one record per samples file)")
    args = p.parse_args()
    records = []
    try:
        classifier = digits_metric.load_classifier(args.classifier)
        ref = digits_metric.activations(read_images(args.reference)[0], classifier)
        print(f"{'samples':<40} {'N':>6} {'FD':>9} {'IS':>7} {'precision':>10} {'recall':>7} {'label acc':>9}")
        for path in args.samples:
            images, labels = read_images(path)
            acts = digits_metric.activations(images, classifier)
            m = digits_metric.score(acts, ref)
            label_acc = digits_metric.label_accuracy(acts, labels)[0] if labels is not None else None
            acc = f"{label_acc:>9.4f}" if label_acc is not None else f"{'-':>9}"
            print(
                f"{path:<40} {len(images):>6} {max(m['fd'], 0.0):>9.3f} {m['is']:>7.3f} {m['precision']:>10.4f} "
                f"{m['recall']:>7.4f} {acc}"
            )
            records.append(
                {"samples": path, "n": len(images), "fd": max(float(m["fd"]), 0.0), "is": float(m["is"]),
                 "precision": float(m["precision"]), "recall": float(m["recall"]),
                 "label_accuracy": None if label_acc is None else float(label_acc)}
            )  # fmt: skip
        if args.json:  # whole or not at all: paper_tables.py reads it
            text = json.dumps(records, indent=1) + "\n"
            atomic_write(args.json, lambda f: f.write(text), mode="w")
    except (DataError, ValueError, OSError) as e:
        print(f"digits_eval.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
