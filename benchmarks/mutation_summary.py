"""Summarise a mutmut run (``make mutation``) into benchmarks/results/mutation.{json,md}.

Reads ``mutmut results --all true`` in the directory the run used, counts each module's
mutants by outcome, and lists every surviving mutant with its change (``mutmut show``) and
its explanation from ``benchmarks/mutation_equivalent.yaml``, or UNEXPLAINED. A rule there
is a reason plus a glob over mutant names (``mutant``) and/or a regular expression searched
in the mutant's change (``change``: its removed and added lines, ``- old`` / ``+ new``), so
a rule keeps naming the same kind of change when mutmut renumbers the mutants of an edited
function. Exit status 1 when an unexplained survivor remains, so the habit has teeth:

    make mutation                      # mutmut run, then this script
    python benchmarks/mutation_summary.py --mutants_dir . --out benchmarks/results

mutmut forks each mutant's test run from a process that has already imported the code, so a
function that runs at import time (a module-level table built by calling it, such as the model
zoo's recipes) always runs unmutated and its mutants "survive" whatever the tests check.
``--fresh GLOB`` reruns the survivors whose names match in a new process each, with the mutant
switched on from the start (``MUTANT_UNDER_TEST``; the test selection of the run's ``setup.cfg``,
``pytest -x``); a mutant whose tests fail there is counted as ``killed in a fresh process``.
The selection must pass in a fresh process with no mutant first, or the script stops.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import configparser
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
FRESH = "killed in a fresh process"


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


def module_and_function(name: str, root: str = ROOT) -> tuple[str, str]:
    """``dkdm.x.gaussian.xǁClassǁmethod__mutmut_3`` -> (``dkdm/x/gaussian.py``, ``Class.method``).

    A package's own module (``dkdm.distill.objectives``, a folder under ``root``) is its ``__init__.py``.
    """
    base = name.rsplit("__mutmut_", 1)[0]
    if ".xǁ" in base:
        mod, rest = base.split(".xǁ", 1)
        func = rest.replace("ǁ", ".")
    else:
        mod, _, func = base.rpartition(".x_")
    path = mod.replace(".", "/")
    return (f"{path}/__init__.py" if os.path.isdir(os.path.join(root, path)) else f"{path}.py"), func


def read_change(directory: str, mutmut: str, name: str) -> str:
    """The mutant's removed and added lines (``- old`` / ``+ new``), one per line."""
    out = subprocess.run([mutmut, "show", name], cwd=directory, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    return "\n".join(
        line[0] + " " + line[1:].strip() for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def test_selection(directory: str) -> list[str]:
    """The run's test selection: ``pytest_add_cli_args_test_selection`` of ``setup.cfg`` in ``directory``."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(directory, "setup.cfg"))
    return parser.get("mutmut", "pytest_add_cli_args_test_selection", fallback="").split()


def fails_in_fresh_process(directory: str, mutant: str, selection: list[str], timeout: float = 900) -> bool:
    """Whether the selection fails in a new process with ``mutant`` on from the start ("" = no mutant).

    Any nonzero exit counts, a collection error included (a mutant that breaks the import of the
    code is detected); ``recheck_fresh`` makes sure the selection passes without a mutant first. A
    run past ``timeout`` seconds counts as failed, as mutmut counts its timeouts.
    """
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": os.path.join(directory, "mutants")}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
            check=False,
            cwd=os.path.join(directory, "mutants"),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return True
    if not mutant and run.returncode:
        raise SystemExit(
            f"mutation_summary.py: error: the test selection fails with no mutant in a fresh process "
            f"(pytest exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
        )
    return run.returncode != 0


def recheck_fresh(directory: str, names: list[str], workers: int = 2) -> set[str]:
    """The mutants among ``names`` whose tests fail in a fresh process (see the module docstring)."""
    if not names:
        return set()
    selection = test_selection(directory)
    fails_in_fresh_process(directory, "", selection)  # raises unless the selection passes unmutated
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        failed = list(pool.map(lambda n: fails_in_fresh_process(directory, n, selection), names))
    return {n for n, f in zip(names, failed) if f}


def load_rules(path: str) -> list[dict]:
    """The YAML's rules, each checked: a ``reason`` and at least one of ``mutant`` / ``change``."""
    with open(path) as f:
        rules = yaml.safe_load(f) or []
    if not isinstance(rules, list):
        raise SystemExit(f"mutation_summary.py: error: {path} must be a list of rules (reason, mutant, change)")
    for i, rule in enumerate(rules):
        unknown = set(rule) - {"reason", "mutant", "change"}
        if "reason" not in rule or not ({"mutant", "change"} & set(rule)) or unknown:
            raise SystemExit(
                f"mutation_summary.py: error: rule {i} of {path} needs a reason and a mutant glob "
                f"and/or a change regex (unknown keys: {sorted(unknown)})"
            )
        if "change" in rule:
            re.compile(rule["change"])
    return rules


def explain(name: str, change: str, rules: list[dict]) -> str | None:
    """The first rule whose glob matches the name and whose regex is found in the change."""
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.get("mutant", "*")) and re.search(rule.get("change", ""), change):
            return rule["reason"]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutants_dir", default=ROOT, help="where `mutmut run` ran (it holds mutants/)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--rules", default=os.path.join(HERE, "mutation_equivalent.yaml"))
    p.add_argument("--mutmut", default=os.path.join(os.path.dirname(sys.executable), "mutmut"))
    p.add_argument(
        "--fresh",
        action="append",
        default=[],
        metavar="GLOB",
        help="rerun the survivors matching GLOB in a fresh process each (functions that run at import)",
    )
    args = p.parse_args()
    results = read_results(args.mutants_dir, args.mutmut)
    if not results:
        print("mutation_summary.py: error: no mutants found; run `mutmut run` first", file=sys.stderr)
        return 2
    recheck = sorted(
        n for n, s in results.items() if s == "survived" and any(fnmatch.fnmatchcase(n, g) for g in args.fresh)
    )
    for name in recheck_fresh(args.mutants_dir, recheck):
        results[name] = FRESH
    rules = load_rules(args.rules)
    counts: dict = collections.defaultdict(collections.Counter)
    for name, status in results.items():
        counts[module_and_function(name)[0]][status] += 1
    # A timeout is a detected mutant (the tests did not finish: mutmut's own convention); every
    # other outcome that is not "killed" (survived, suspicious, no tests, interrupted) must be explained.
    alive = sorted(n for n, s in results.items() if s not in ("killed", "timeout", FRESH))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        changes = dict(zip(alive, pool.map(lambda n: read_change(args.mutants_dir, args.mutmut, n), alive)))
    survivors = []
    for name in alive:
        module, func = module_and_function(name)
        survivors.append(
            {
                "mutant": name,
                "module": module,
                "function": func,
                "status": results[name],
                "change": changes[name],
                "explanation": explain(name, changes[name], rules),
            }
        )
    unexplained = [s for s in survivors if s["explanation"] is None]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=args.mutants_dir, capture_output=True, text=True
    )
    summary = {
        "command": "make mutation  (mutmut run --max-children 2 with setup.cfg's [mutmut]; then this script"
        + "".join(f" --fresh '{g}'" for g in args.fresh)
        + ")",
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip() or None,
        "modules": {m: dict(c) for m, c in sorted(counts.items())},
        "survivors": survivors,
        "unexplained": len(unexplained),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mutation.json"), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    statuses = sorted({s for c in counts.values() for s in c})
    fresh_note = []
    if args.fresh:
        fresh_note.append(
            f"Survivors matching {', '.join(f'`{g}`' for g in args.fresh)} were rerun in a fresh process each "
            "(they run at import, before mutmut's forked test run switches the mutant on): "
            f"{len(recheck)} rerun, {sum(s == FRESH for s in results.values())} {FRESH}."
        )
    lines = [
        "# Mutation testing: the modules where a wrong sign is a silent FID loss",
        "",
        f"Command: `make mutation` ({summary['date']}, commit {str(summary['commit'])[:10]}). mutmut mutates",
        "every covered line of the modules below and runs the test files listed in `setup.cfg`",
        "against each mutant. A timeout counts as detected (the tests did not finish).",
        *fresh_note,
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
