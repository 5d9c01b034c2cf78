"""The tree's own rules (docs/design.md section 3), checked: imports run downhill without cycles (function-level
imports included), no module past about 800 lines, nothing private used across modules, no comment narrating a
session, ruff clean."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffaug_kernels"
MODULES = sorted(PKG.rglob("*.py"))

# layer of each top-level part of the package, higher imports lower (docs/design.md section 2)
LAYERS = {"cli": 6, "__main__": 6, "commands": 6, "bench": 5, "augment": 4, "ensemble": 4, "dda": 4, "ood": 4,
          "robustness": 4, "certify": 4, "sampling": 4, "pag": 4, "models": 3, "data": 3, "ops": 3, "schedule": 2,
          "metrics": 3, "utils": 1, "constants": 1, "__init__": 7}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set:
    """The package modules a module imports, anywhere in it (function bodies included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffaug_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("diffaug_kernels"):
                mod = node.module
            else:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports the module x
    known = {module_name(p) for p in MODULES}
    return {m for m in found if m in known and m != name}


GRAPH = {module_name(p): imports(p) for p in MODULES}


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if d == "diffaug_kernels" or m.startswith(d + "."):  # a package's __init__ runs first anyway
                continue
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_imports_run_downhill():
    up = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
          if d != "diffaug_kernels" and not m.startswith(d + ".") and layer(d) > layer(m)]
    assert not up, "imports reaching up a layer: " + ", ".join(sorted(up))


def test_no_module_past_800_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 800}
    assert not long, long


def test_nothing_private_is_used_across_modules():
    """`alias._name` where alias is a package module imported here, or `from diffaug_kernels... import _name`."""
    bad = []
    for p in MODULES + sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(p.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("diffaug_kernels")):
                for a in node.names:
                    if a.name.startswith("_") and a.name not in ("__version__", "_C"):  # _C: the compiled extension
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("diffaug")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, bad


def test_no_comment_narrates_a_session():
    files = [*MODULES, *(ROOT / "csrc").glob("*"), *(ROOT / "tools").glob("*"), *ROOT.glob("tests/**/*.py"),
             *ROOT.glob("tests/cpp/*"), *(ROOT / "benchmarks").glob("*.py")]
    pat = re.compile(r"\bsessions?[- ]\d+|\b(this|last|next|that|earlier|previous|same|one|a) session\b", re.I)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if pat.search(line) and p.name != "test_layout.py"]
    assert not hits, hits


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                    capture_output=True).returncode != 0, reason="ruff is not installed (requirements.txt has it)")
def test_ruff_is_clean():
    cmd = ["ruff"] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    r = subprocess.run(cmd + ["check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_every_file_the_code_and_docs_cite_exists():
    """Paths named in the code, the tools, the tests, README.md and docs/design.md point at files in the tree."""
    pat = re.compile(r"(?<![\w/.])((?:tools|csrc|docs|tests|benchmarks|diffaug_kernels|python)/[\w/.-]*\w\."
                     r"(?:py|sh|md|h|cpp|cu|json|png|safetensors))")
    files = [*MODULES, *(ROOT / "csrc").glob("*"), *(ROOT / "tools").glob("*"), *ROOT.glob("tests/**/*.py"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "README.md", ROOT / "docs" / "design.md", ROOT / "setup.py",
             ROOT / "CMakeLists.txt"]
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in files if p.is_file()
                      for m in pat.findall(p.read_text(errors="replace"))
                      if "<" not in m and "*" not in m and not (ROOT / m).exists()})
    assert not missing, missing
