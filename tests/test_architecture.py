"""The package's shape, read from its imports: subpackages in the order data flows, no
cycles, no import from a later stage; every third-party import pinned where it is installed."""

import ast
import importlib.metadata
import re
import sys

import yaml

from iisan.core.provenance import imports, modules, stage_modules

from conftest import REPO

# the order data flows; results and use both follow train and do not import each other
ORDER = {"core": 0, "data": 1, "extract": 2, "train": 3, "results": 4, "use": 4, "pipeline": 5, "cli": 6}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else None


def test_every_module_lives_in_a_stage():
    loose = [m for m in modules() if stage(m) is None and m not in ("iisan", "iisan.__main__")]
    assert not loose, loose
    for pkg in ORDER:  # each says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((REPO / "iisan" / pkg / "__init__.py").read_text()))
        assert doc and "May import" in doc, pkg


def test_no_import_reaches_a_later_stage():
    wrong = []
    for m in modules():
        for dep in imports(m):
            a, b = stage(m), stage(dep)
            if a is None or b is None or a == b:
                continue
            if ORDER[b] >= ORDER[a]:  # later, or a sibling of the same rank (results <-> use)
                wrong.append(f"{m} -> {dep}")
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph = {m: set(imports(m)) & set(modules()) for m in modules()}
    seen, on_path, cycles = set(), [], []

    def visit(m):
        if m in on_path:
            cycles.append([*on_path[on_path.index(m) :], m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def _third_party(module_names) -> set[str]:
    """Distributions imported by these iisan modules (module level and inside functions)."""
    dists = importlib.metadata.packages_distributions()
    found = set()
    for m in module_names:
        path = REPO / "iisan" / (m.split(".", 1)[1].replace(".", "/") if "." in m else "")
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "iisan" and top not in sys.stdlib_module_names:
                    found.update(d.lower() for d in dists[top])
    return found


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.fullmatch(r"\s*-?\s*([A-Za-z0-9_.-]+)==([^\s#]+).*", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_imported_package_is_pinned():
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    imported = {_norm(d) for d in _third_party(modules())}
    assert imported <= set(required), sorted(imported - set(required))
    assert {"scipy", "pandas", "pyarrow"} <= set(required)  # pandas writes Parquet through pyarrow
    pyproject = _pins(re.findall(r'"([^"]+==[^"]+)"', (REPO / "pyproject.toml").read_text()))
    assert pyproject == {k: v for k, v in required.items() if k in pyproject}, "pyproject.toml and requirements differ"
    assert imported <= set(pyproject), sorted(imported - set(pyproject))


def test_the_light_environment_holds_what_aggregate_and_report_import():
    env = yaml.safe_load((REPO / "envs/report.yaml").read_text())
    light = _pins(next(d for d in env["dependencies"] if isinstance(d, dict))["pip"])
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert light == {k: required[k] for k in light}  # the same versions as everywhere else
    needed = {_norm(d) for d in _third_party(stage_modules("report") + stage_modules("aggregate") + ["iisan.cli"])}
    assert needed <= set(light) and "torch" not in needed, sorted(needed - set(light))
    rules = (REPO / "workflow/rules/report.smk").read_text() + (REPO / "workflow/rules/train.smk").read_text()
    for rule in ("report", "report_batch_size", "aggregate"):
        body = re.search(rf"(?ms)^rule {rule}:\n(.*?)(?=^rule |^use rule |\Z)", rules).group(1)
        assert "envs/report.yaml" in body, rule
