"""The package map holds: no import cycle between prime_jax's modules or packages (imports inside
`if TYPE_CHECKING:` are for annotations only), and config keys are read only in prime_jax/settings/."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "prime_jax")


def modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imports(path: str, known: dict[str, str]) -> set[str]:
    tree = ast.parse(open(path).read())
    typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and getattr(t.test, "id", "") == "TYPE_CHECKING"
                   for b in t.body for n in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prime_jax"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_between_modules_or_packages():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    assert cycles(graph) == []
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731  (prime_jax.<package or module>)
    packages: dict[str, set[str]] = {}
    for m, deps in graph.items():
        packages.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    assert cycles(packages) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_config_keys_are_read_only_in_settings():
    """Outside prime_jax/settings/ (and config.py, which defines the keys), code may build a config (the AOT plans and
    the experiment's arms assign keys) but reads none: `c.<section>.<key>` appears only as an assignment target."""
    sections = ("model", "data", "rollout", "train", "algorithm", "actor", "prm", "verifier", "eval", "checkpoint",
                "log", "warm_start", "synthetic", "mesh", "length_mix", "compare")
    read = re.compile(r"(?<![\w.\-])(?:c|rc|cfg|config)\.(?:" + "|".join(sections) + r")\.\w+")
    assignment = re.compile(r"^\s*[\w.,\s]+\s=\s")  # a, b.c = ...: what is left of " = " is written, not read
    offenders = []
    for name, path in modules().items():
        if name.startswith(("prime_jax.settings", "prime_jax.config")):
            continue
        for number, line in enumerate(open(path), 1):
            code = line.split("#")[0]
            if assignment.match(code):
                code = code.split(" = ", 1)[1]
            code = re.sub(r"(\"[^\"]*\"|'[^']*')", "", code)  # messages may name keys
            offenders += [f"{os.path.relpath(path, ROOT)}:{number}: {m}" for m in read.findall(code)]
    assert offenders == []
