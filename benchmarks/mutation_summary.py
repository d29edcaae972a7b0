"""Summarise a mutmut run (``make mutation``) into benchmarks/results/mutation.{json,md}.

Reads ``mutmut results --all true`` in the directory the run used, counts each module's
mutants by outcome, and lists every surviving mutant with its explanation from
``benchmarks/mutation_equivalent.yaml`` (a glob over mutant names -> why the mutant cannot
change a result, e.g. it edits an error message), or UNEXPLAINED. Exit status 1 when an
unexplained survivor remains, so the habit has teeth:

    make mutation                      # mutmut run, then this script
    python benchmarks/mutation_summary.py --mutants_dir . --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import json
import os
import re
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def read_results(directory: str, mutmut: str) -> dict[str, str]:
    """Mutant name -> status ('killed', 'survived', 'timeout', 'no tests', ...)."""
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=directory, capture_output=True, text=True, check=True
    ).stdout
    results = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m:
            results[m.group(1)] = m.group(2).strip()
    return results


def module_and_function(name: str) -> tuple[str, str]:
    """``dkdm.x.gaussian.xǁClassǁmethod__mutmut_3`` -> (``dkdm/x/gaussian.py``, ``Class.method``)."""
    base = name.rsplit("__mutmut_", 1)[0]
    if ".xǁ" in base:
        mod, rest = base.split(".xǁ", 1)
        func = rest.replace("ǁ", ".")
    else:
        mod, _, func = base.rpartition(".x_")
    return mod.replace(".", "/") + ".py", func


def explain(name: str, rules: dict[str, str]) -> str | None:
    for pattern, reason in rules.items():
        if fnmatch.fnmatchcase(name, pattern):
            return reason
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutants_dir", default=ROOT, help="where `mutmut run` ran (it holds mutants/)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--rules", default=os.path.join(HERE, "mutation_equivalent.yaml"))
    p.add_argument("--mutmut", default=os.path.join(os.path.dirname(sys.executable), "mutmut"))
    args = p.parse_args()
    results = read_results(args.mutants_dir, args.mutmut)
    if not results:
        print("mutation_summary.py: error: no mutants found; run `mutmut run` first", file=sys.stderr)
        return 2
    with open(args.rules) as f:
        rules = yaml.safe_load(f) or {}
    counts: dict = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in sorted(results.items()):
        module, func = module_and_function(name)
        counts[module][status] += 1
        if status in ("survived", "suspicious", "timeout", "no tests"):
            survivors.append(
                {
                    "mutant": name,
                    "module": module,
                    "function": func,
                    "status": status,
                    "explanation": explain(name, rules),
                }
            )
    unexplained = [s for s in survivors if s["explanation"] is None]
    summary = {
        "command": "make mutation  (mutmut run --max-children 2 with setup.cfg's [mutmut]; then this script)",
        "date": datetime.date.today().isoformat(),
        "modules": {m: dict(c) for m, c in sorted(counts.items())},
        "survivors": survivors,
        "unexplained": len(unexplained),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mutation.json"), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    statuses = sorted({s for c in counts.values() for s in c})
    lines = [
        "# Mutation testing: the modules where a wrong sign is a silent FID loss",
        "",
        f"Command: `make mutation` ({summary['date']}). mutmut mutates every covered line of the modules",
        "below and runs the test files listed in `setup.cfg` against each mutant.",
        "",
        "| module | " + " | ".join(statuses) + " |",
        "|---|" + "---:|" * len(statuses),
    ]
    for module, c in sorted(counts.items()):
        lines.append(f"| {module} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |")
    lines += ["", f"Surviving mutants: {len(survivors)}, unexplained: {len(unexplained)}.", ""]
    by_reason: dict = collections.defaultdict(list)
    for s in survivors:
        by_reason[s["explanation"] or "UNEXPLAINED"].append(s)
    for reason, items in sorted(by_reason.items(), key=lambda kv: (kv[0] != "UNEXPLAINED", kv[0])):
        funcs = collections.Counter(f"{s['module']}:{s['function']}" for s in items)
        lines.append(f"- **{reason}** ({len(items)}): " + ", ".join(f"`{f}` x{n}" for f, n in sorted(funcs.items())))
    with open(os.path.join(args.out, "mutation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({"modules": summary["modules"], "survivors": len(survivors), "unexplained": len(unexplained)}))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
