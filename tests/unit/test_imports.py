"""The package's house rules (docs/architecture.md, "Code map", "The dependency rule"):
sub-packages by role, imports that only point one way, no import circle; and benchmarks/,
which has no import circle either and uses only its documented interface to the package.
Parsed from the sources (ast), lazy imports inside functions included, so a new arrow in the
wrong direction fails here."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "localloss_pp"
BENCHMARKS = REPO / "benchmarks"
LEAVES = {"errors", "seeds", "layout", "faults", "durable"}

# room -> the rooms it may import from (besides itself)
ALLOWED = {
    "leaf": set(),
    "config": {"leaf"},
    "flags": {"leaf", "config", "data"},
    "plugins": {"leaf"},
    "models": {"leaf", "config", "plugins"},
    "data": {"leaf", "config", "plugins"},
    "observe": {"leaf", "config", "models", "data"},
    "pipeline": {"leaf", "config", "models", "data", "observe"},
    "run": {"leaf", "config", "models", "data", "observe"},
    "result": {"leaf", "config", "observe", "run"},
    "training": {"leaf", "config", "models", "data", "observe", "pipeline", "run", "result"},
    "api": {"leaf", "config", "flags", "models", "data", "observe", "run", "result",
            "training"},
    "cli": {"leaf", "config", "flags", "models", "data", "observe", "pipeline", "run",
            "training"},
    "package": {"cli"},  # __init__ and __main__ (the public names: imported lazily)
}

# The modules of localloss_pp that benchmarks/ may import: what it imports at the time of
# writing (docs/architecture.md names pipeline/build.py as used by benchmarks/worker.py; the
# rest are the configuration, the model builder and losses, the data paths, the partition, the
# process-group set-up, the transport's fingerprint and header size, the global-backprop step,
# the profiler window and timelines, and the weight snapshots). A benchmark that needs another
# module of the package adds it here, on purpose.
BENCHMARKS_INTERFACE = {
    "localloss_pp.config",
    "localloss_pp.data.batches",
    "localloss_pp.data.datasets",
    "localloss_pp.models",
    "localloss_pp.models.losses",
    "localloss_pp.models.vit",
    "localloss_pp.observe.profiling",
    "localloss_pp.pipeline.build",
    "localloss_pp.pipeline.distributed",
    "localloss_pp.pipeline.globalmode",
    "localloss_pp.pipeline.partition",
    "localloss_pp.pipeline.transport",
    "localloss_pp.run.snapshots",
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "package"
    top = parts[1]
    if top in LEAVES:
        return "leaf"
    return top


def is_module(name: str, root: Path) -> bool:
    path = root.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path, root: Path = PACKAGE, tops=("localloss_pp",)) -> set[str]:
    """Every module of the packages `tops` that `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in tops}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in tops:
                continue
            found.add(target)
            # `from localloss_pp.x import y` where y is a module
            found |= {f"{target}.{a.name}" for a in node.names
                      if is_module(f"{target}.{a.name}", root)}
    return found


def graph(root: Path = PACKAGE, tops=("localloss_pp",)) -> dict[str, set[str]]:
    return {module_name(p, root): imports_of(p, root, tops) for p in root.rglob("*.py")}


def benchmarks_graph(root: Path = BENCHMARKS) -> dict[str, set[str]]:
    """benchmarks/'s modules -> the modules of benchmarks/ and of localloss_pp they import."""
    return graph(root, tops=(root.name, "localloss_pp"))


def outside_interface(g: dict[str, set[str]]) -> list[str]:
    """The imports of localloss_pp modules that are not in BENCHMARKS_INTERFACE."""
    return sorted(f"{module} imports {target}" for module, targets in g.items()
                  for target in targets
                  if target.split(".")[0] == "localloss_pp" and target not in BENCHMARKS_INTERFACE)


def wrong_arrows(g: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in g.items():
        for target in targets:
            src, dst = room(module), room(target)
            if target == "localloss_pp":
                continue  # `from localloss_pp import __version__`: the package's version only
            if src != dst and dst not in ALLOWED[src]:
                wrong.append(f"{module} ({src}) imports {target} ({dst})")
            if src == "leaf" and dst == "leaf" and module != target:
                wrong.append(f"leaf {module} imports leaf {target}")
    return sorted(wrong)


def circle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `g` (a package's __init__ importing its own modules aside)."""
    edges = {m: {t for t in ts if t in g and t != m and not t.startswith(m + ".")}
             for m, ts in g.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_is_in_a_documented_room():
    rooms = {room(m) for m in graph()}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


def test_no_import_points_the_wrong_way():
    assert not (wrong := wrong_arrows(graph())), "\n".join(wrong)


def test_no_import_circle():
    assert (found := circle(graph())) is None, "import circle: " + " -> ".join(found)


def test_the_checker_finds_a_wrong_arrow_and_a_circle(tmp_path):
    """The rules themselves, on a small package: a model importing the pipeline is an arrow the
    wrong way, and two modules importing each other are a circle."""
    root = tmp_path / "localloss_pp"
    for name, text in {
        "__init__.py": "",
        "config.py": "",
        "models/__init__.py": "",
        "models/blocks.py": "from localloss_pp.pipeline import stage\n",
        "pipeline/__init__.py": "",
        "pipeline/stage.py": "from ..models.blocks import X\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    g = graph(root)
    assert wrong_arrows(g) == [
        "localloss_pp.models.blocks (models) imports localloss_pp.pipeline (pipeline)",
        "localloss_pp.models.blocks (models) imports localloss_pp.pipeline.stage (pipeline)"]
    assert circle(g) in (["localloss_pp.models.blocks", "localloss_pp.pipeline.stage",
                          "localloss_pp.models.blocks"],
                         ["localloss_pp.pipeline.stage", "localloss_pp.models.blocks",
                          "localloss_pp.pipeline.stage"])


def test_benchmarks_have_no_import_circle():
    g = benchmarks_graph()
    assert "benchmarks.throughput" in g and "benchmarks.common" in g
    assert (found := circle(g)) is None, "import circle: " + " -> ".join(found)


def test_benchmarks_import_only_the_documented_interface_of_the_package():
    g = benchmarks_graph()
    assert not (wrong := outside_interface(g)), "\n".join(wrong)
    used = {t for targets in g.values() for t in targets if t.startswith("localloss_pp")}
    assert used == BENCHMARKS_INTERFACE, BENCHMARKS_INTERFACE - used  # no stale entry


def test_the_benchmark_checker_finds_a_circle_and_a_new_import(tmp_path):
    """Two benchmark modules importing each other (one lazily, one relatively) are a circle; a
    module of the package outside the interface is reported."""
    root = tmp_path / "benchmarks"
    root.mkdir()
    (tmp_path / "localloss_pp" / "run").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "common.py": "def f():\n    from benchmarks.throughput import main\n",
        "throughput.py": "from .common import f\nfrom localloss_pp.run import checkpoint\n",
    }.items():
        (root / name).write_text(text)
    (tmp_path / "localloss_pp" / "run" / "checkpoint.py").write_text("")
    g = benchmarks_graph(root)
    assert circle(g) in (["benchmarks.common", "benchmarks.throughput", "benchmarks.common"],
                         ["benchmarks.throughput", "benchmarks.common", "benchmarks.throughput"])
    assert outside_interface(g) == ["benchmarks.throughput imports localloss_pp.run",
                                    "benchmarks.throughput imports localloss_pp.run.checkpoint"]
