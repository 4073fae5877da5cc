"""The layers stay apart, read from the source's imports (every import statement, at any depth).

- policies/ is pure: it imports only itself and pure standard modules, and does no I/O
  (no files, sockets, processes, printing, clock or randomness);
- relay/ imports only itself and the policies' decision (it knows SMTP, not prices);
- no import cycle among the project's modules, TYPE_CHECKING imports included;
- only the factory builds a store: no other module imports mailmeter.metering.sqlite or
  .postgres, and neither store imports the other; the relay node and the admin HTTP API
  never import each other (the composition root, mailmeter/serve.py, joins them);
- every import uses the installed names (mailmeter.relay, not relay);
- every module says what it is for in its docstring's first one or two lines.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The standard library's pure modules a policy may use: no I/O, no clock, no randomness.
PURE_STDLIB = {
    "__future__",
    "abc",
    "bisect",
    "calendar",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "re",
    "string",
    "types",
    "typing",
    "zoneinfo",
}
# Calls that do I/O or read the clock, by name (open(...)) or attribute (datetime.now(...)).
IO_CALLS = {"open", "print", "input", "breakpoint", "exec", "eval", "compile", "__import__"}
CLOCK_ATTRIBUTES = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "sleep", "localtime", "gmtime"}


@dataclass(frozen=True)
class Module:
    name: str  # as installed: mailmeter.relay.smtpd
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


@cache
def project() -> dict[str, Module]:
    """Every module of the distribution, by its installed name (pyproject's package-dir)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: package.replace(".", "/") for package in setuptools["packages"]}
    for package, folder in setuptools["package-dir"].items():
        for name in folders:
            if name == package or name.startswith(package + "."):
                folders[name] = folder + name[len(package) :].replace(".", "/")
    modules: dict[str, Module] = {}
    for package, folder in folders.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            modules[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


def imported(module: Module) -> Iterator[tuple[int, str]]:
    """(line, module name) of every import in the module; `from a import b` names a.b when that is a module."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.package.split(".")[: len(module.package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if candidate in project() else base


def project_target(name: str) -> str | None:
    """The project module an imported name is (or is inside), if any."""
    while name:
        if name in project():
            return name
        name = name.rpartition(".")[0]
    return None


def modules_under(prefix: str) -> list[Module]:
    return [m for name, m in project().items() if name == prefix or name.startswith(prefix + ".")]


def where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(REPO)}:{line}"


def test_the_project_is_found() -> None:
    names = set(project())
    assert {
        "mailmeter.serve",
        "mailmeter.relay.smtpd",
        "mailmeter.metering.sqlite.ledger",
        "mailmeter.metering.postgres",
        "mailmeter.policies.decision",
    } <= names
    assert len(names) > 70


def test_policies_import_only_policies_and_pure_standard_modules() -> None:
    offenders = [
        (where(module, line), name)
        for module in modules_under("mailmeter.policies")
        for line, name in imported(module)
        if not (name == "mailmeter.policies" or name.startswith("mailmeter.policies.") or name in PURE_STDLIB)
    ]
    assert offenders == []


def test_policies_do_no_io() -> None:
    offenders = []
    for module in modules_under("mailmeter.policies"):
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            if isinstance(function, ast.Name) and function.id in IO_CALLS:
                offenders.append((where(module, node.lineno), function.id))
            elif isinstance(function, ast.Attribute) and function.attr in CLOCK_ATTRIBUTES:
                offenders.append((where(module, node.lineno), function.attr))
    assert offenders == []


def test_relay_imports_only_relay_and_the_policy_decision() -> None:
    offenders = [
        (where(module, line), name)
        for module in modules_under("mailmeter.relay")
        for line, name in imported(module)
        if (target := project_target(name)) is not None
        and not (target.startswith("mailmeter.relay") or target == "mailmeter.policies.decision")
    ]
    assert offenders == []


def test_relay_and_policies_import_nothing_of_the_meter_or_the_composition() -> None:
    """The rule of issue 16 item 6 in its own words, whatever the finer rules above allow."""
    offenders = [
        (where(module, line), name)
        for module in modules_under("mailmeter.relay") + modules_under("mailmeter.policies")
        for line, name in imported(module)
        if name == "mailmeter"
        or name.startswith("mailmeter.metering")
        or (name.startswith("mailmeter.") and name.split(".")[1] not in ("relay", "policies"))
    ]
    assert offenders == []


def cycles() -> list[list[str]]:
    """The strongly connected components of the import graph with more than one module (or a self-import)."""
    graph = {
        name: sorted({t for _, imp in imported(module) if (t := project_target(imp)) is not None})
        for name, module in project().items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return found


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_only_the_factory_builds_a_store_and_no_store_imports_the_other() -> None:
    stores = ("mailmeter.metering.sqlite", "mailmeter.metering.postgres")
    offenders = []
    for name, module in project().items():
        own = next((store for store in stores if name == store or name.startswith(store + ".")), None)
        for line, imp in imported(module):
            target = project_target(imp) or ""
            store = next((s for s in stores if target == s or target.startswith(s + ".")), None)
            if store is not None and store != own and name != "mailmeter.factory":
                offenders.append((where(module, line), imp))
    assert offenders == []


def test_the_node_and_the_http_api_do_not_import_each_other() -> None:
    http = {"mailmeter.api", "mailmeter.openapi", "mailmeter.apiauth"}
    node = {"mailmeter.node", "mailmeter.serve"}
    offenders = [
        (where(module, line), imp)
        for name, module in project().items()
        for line, imp in imported(module)
        if (name == "mailmeter.node" and (project_target(imp) in http or imp.split(".")[0] == "aiohttp"))
        or (name in http and project_target(imp) in node)
    ]
    assert offenders == []


def test_imports_use_the_installed_names() -> None:
    """The repository's root has relay/, metering/ and policies/ folders, so `import relay` works
    from a checkout but not from an installed wheel: nothing may import those names."""
    sources = [m.path for m in project().values()] + sorted((REPO / "tests").rglob("*.py"))
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            )
            offenders += [
                (f"{path.relative_to(REPO)}:{node.lineno}", n)
                for n in names
                if n.split(".")[0] in ("relay", "metering", "policies")
            ]
    assert offenders == []


def test_every_module_says_what_it_is_for() -> None:
    missing = []
    for module in project().values():
        docstring = ast.get_docstring(module.tree) or ""
        summary = docstring.split("\n\n")[0].strip()
        if not summary or len(summary.splitlines()) > 2:
            missing.append(str(module.path.relative_to(REPO)))
    assert missing == []
