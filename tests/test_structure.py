"""The house's structure: the library never imports scripts, diffusion and models stay apart,
the evaluator needs no torch, and the package's modules import each other without cycles."""

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _imports(path, top_level_only):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
            pkg = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".").split(".")
            base = pkg[: len(pkg) - node.level + 1]
            yield ".".join(base + ([node.module] if node.module else []))


def _modules(package):
    for d, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield name, path


def test_library_never_imports_scripts_or_benchmarks_and_diffusion_and_models_stay_apart():
    for name, path in _modules("dkdm"):
        imported = set(_imports(path, top_level_only=False))
        assert not {i for i in imported if i.split(".")[0] in ("scripts", "benchmarks", "tests")}, name
        if name.startswith("dkdm.diffusion"):
            assert not {i for i in imported if i.startswith("dkdm.models")}, name
        if name.startswith("dkdm.models"):
            assert not {i for i in imported if i.startswith(("dkdm.diffusion", "dkdm.distill", "dkdm.training"))}, name


def test_evaluations_import_nothing_that_pulls_torch():
    for name, path in _modules("evaluations"):
        imported = set(_imports(path, top_level_only=False))
        assert not {i for i in imported if i.split(".")[0] in ("torch", "dkdm")}, name


def test_no_import_cycles_between_modules():
    names = dict(_modules("dkdm"))
    graph = {}
    for name, path in names.items():
        deps = set()
        for i in _imports(path, top_level_only=True):
            while i and i not in names:  # "from dkdm.models.zoo import x" -> dkdm.models.zoo
                i = i.rpartition(".")[0]
            if i and i != name and not name.startswith(i + "."):  # a package's own __init__ is not a cycle
                deps.add(i)
        graph[name] = deps
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in graph[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
            if m not in state:
                visit(m, [*stack, m])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])
