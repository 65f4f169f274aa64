"""House rules the code base keeps: imports go flows -> tasks -> lib; lib never imports Prefect;
only the tracking module (and the MLflow model-from-code file it logs) imports MLflow; what tests
share lives in tests/support/, and no test module imports another."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The MLflow layer, one job each: the store connection, runs, versions, the champion, a model's
# benchmark, loading a version, the version's folder, and the model-from-code file MLflow runs at
# load time.
MLFLOW_ALLOWED = {
    "lib/store.py",
    "lib/tracking.py",
    "lib/registry.py",
    "lib/champion.py",
    "lib/benchmark_store.py",
    "lib/loading.py",
    "lib/packaging.py",
    "lib/adapter_pyfunc.py",
}

PROJECT = {"flows", "tasks", "lib"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def test_lib_never_imports_prefect_tasks_or_flows():
    for path in files("lib"):
        bad = imported_roots(path) & {"prefect", "tasks", "flows"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_tracking_module_imports_mlflow():
    for package in ("lib", "tasks", "flows"):
        for path in files(package):
            rel = str(path.relative_to(ROOT))
            if rel not in MLFLOW_ALLOWED:
                assert "mlflow" not in imported_roots(path), f"{rel} imports mlflow"


def test_the_modules_a_version_carries_import_nothing_of_the_project():
    """lib/packaging.py copies them into every registered version (package lenta_lora_runtime): they
    may import each other relatively, never `lib` (absent where a version is loaded)."""
    from lib.packaging import RUNTIME_MODULES

    for name in RUNTIME_MODULES:
        roots = imported_roots(ROOT / "lib" / name)
        assert not roots & {"lib", "tasks", "flows", "prefect", "mlflow"}, (name, roots)


def test_tasks_never_import_flows():
    for path in files("tasks"):
        assert "flows" not in imported_roots(path), path


def test_importing_modules_has_no_side_effects(tmp_path):
    """Importing every module from an empty folder creates no files there (no mkdir, no sqlite db).
    (Prefect itself creates its PREFECT_HOME on import; that lives outside the folder watched.)"""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    modules = [
        f"{p.parent.name}.{p.stem}"
        for pkg in ("lib", "tasks", "flows")
        for p in files(pkg)
        if p.stem not in ("__init__", "adapter_pyfunc")
    ]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    subprocess.run([sys.executable, "-c", code, *modules], cwd=cwd, env=env, check=True, timeout=300)
    created = sorted(p.name for p in cwd.iterdir())
    assert created == [], f"importing created {created}"


def test_modules_stay_readable_in_size():
    for package in ("lib", "tasks", "flows"):
        for path in files(package):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= 350, f"{path.relative_to(ROOT)} has {lines} lines (house style: 100-350)"


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore means "this module's own": a name another module needs is made public
    (or moved to the module whose job it is), so renaming a private helper never breaks a caller."""
    found = []
    for package in ("flows", "tasks", "lib"):
        for path in files(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
                    found += [
                        f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name[0] == "_"
                    ]
    assert found == []


def test_no_import_cycles_among_flows_tasks_and_lib():
    """Every import counts, a function's lazy one too: a cycle broken only by importing late is
    still two modules that need each other (split the module by job instead)."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for package in ("flows", "tasks", "lib")
        for p in files(package)
    }
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, cycles


# ---------------------------------------------------------------- the tests themselves

TESTS = ROOT / "tests"
SUPPORT = "tests.support"  # fakes, servers, shared fixtures and helpers; registered by tests/conftest.py


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute name a file imports, a function's lazy import too; `from M import x` gives M
    and M.x (x may be a submodule), relative imports resolved."""
    package = module_name(path).split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_helpers_live_in_tests_support():
    """Outside tests/support/ there are only test modules, conftests and package markers; inside it
    no test module (pytest would collect it)."""
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "support":
            assert not path.name.startswith("test_"), f"{rel}: a test module in tests/support/"
        else:
            assert path.name.startswith("test_") or path.name in ("conftest.py", "__init__.py"), (
                f"{rel}: a helper outside tests/support/"
            )


def test_no_test_module_imports_another_and_tests_import_only_support_and_conftest():
    test_modules = {module_name(p) for p in TESTS.rglob("test_*.py")}
    for path in sorted(TESTS.rglob("*.py")):
        rel, imported = path.relative_to(ROOT), imported_modules(path)
        other_tests = {n for n in imported for m in test_modules if n == m or n.startswith(m + ".")}
        assert not other_tests, f"{rel} imports test modules {sorted(other_tests)}"
        if path.name.startswith("test_"):
            bad = {
                n
                for n in imported
                if n.startswith("tests.")
                and not n.startswith((f"{SUPPORT}.", "tests.conftest."))
                and n not in (SUPPORT, "tests.conftest")
            }
            assert not bad, f"{rel} imports {sorted(bad)}: tests may import tests.support.* and tests.conftest only"
