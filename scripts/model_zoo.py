"""The model zoo: parameter counts, or one YAML per architecture (configs/arch/ is made with this).

python scripts/model_zoo.py                        # name and parameter count of every entry
python scripts/model_zoo.py --export configs/arch  # write the YAMLs
"""

import argparse

from dkdm.models import ZOO, count_parameters, export_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", metavar="DIR", help="write one YAML per architecture into DIR")
    args = parser.parse_args()
    if args.export:
        for p in export_yaml(args.export):
            print(p)
    else:
        for name in ZOO:
            print(f"{name:18s} {count_parameters(name):>13,d}")


if __name__ == "__main__":
    main()
