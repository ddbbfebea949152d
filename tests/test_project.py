"""The project's promises about itself: README commands, CI, changelog."""

from conftest import ROOT

TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && ./install.sh test && python -m pytest -n auto --dist loadfile"


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in (ROOT / "README.md").read_text()
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_changelog_names_this_version():
    from sdcli import __version__

    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_every_builtin_model_belongs_to_the_family_that_builds_it():
    from sdcli import families, models

    owner = {name: f for f in families.FAMILIES for name in f.builtins}
    assert set(owner) == set(models.BUILTIN)
    for name, spec in models.ARCHITECTURES.items():
        assert spec["pipeline"] in owner[name].pipelines
    assert "StableDiffusionPipeline" in owner["tiny"].pipelines


def test_gpu_evidence_script_parses_and_picks_the_fastest_compared_backends(tmp_path):
    """The one GPU call can't be debugged there: the script at least parses, and the bench step gets the three
    fastest exact backends that passed the compare (never the slow-by-design ones, nor a failure)."""
    import json
    import subprocess
    import sys

    assert subprocess.run(["bash", "-n", ROOT / "scripts" / "gpu-evidence.sh"]).returncode == 0
    rows = [("sdpa-math", "reference", "exact", 0.9), ("sdpa", "pass", "exact", 0.5), ("flex", "pass", "exact", 0.1),
            ("xformers", "pass", "exact", 0.3), ("sdpa-flash", "pass", "exact", 0.4), ("sage1", "pass", "quantized", 0.2),
            ("sdpa-cudnn", "FAIL", "exact", 0.2), ("sdpa-efficient", "pass", "exact", 0.45)]
    compared = tmp_path / "compare.json"
    compared.write_text(json.dumps({"rows": [{"backend": b, "verdict": v, "kind": k, "seconds": t} for b, v, k, t in rows]}))
    picked = subprocess.run([sys.executable, ROOT / "scripts" / "gpu_evidence.py", "fastest", compared, "3"],
                            capture_output=True, text=True, check=True)
    assert picked.stdout.strip() == "xformers,sdpa-flash,sdpa-efficient"


def import_graph() -> dict[str, set[str]]:
    """sdcli's modules and what each imports of sdcli's, at module level and inside functions alike (an import
    inside a function is where a cycle hides); not what is imported for type annotations only (`if TYPE_CHECKING:`).
    `from sdcli import x` names module x where there is one, else the package itself (its __init__)."""
    import ast

    package = ROOT / "sdcli"
    name = lambda path: "sdcli" if path.stem == "__init__" else f"sdcli.{path.stem}"  # noqa: E731
    modules = {name(path): path for path in package.glob("*.py")}
    graph = {}
    for module, path in modules.items():
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("sdcli.")}
            elif isinstance(node, ast.ImportFrom) and node.module == "sdcli":
                edges |= {f"sdcli.{a.name}" if f"sdcli.{a.name}" in modules else "sdcli" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdcli."):
                edges.add(node.module)
        graph[module] = edges - {module}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " → ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    assert len(graph) > 20
    for module in sorted(graph):
        visit(module)


def test_every_error_and_its_exit_status_is_declared_in_one_module():
    """errors.py holds every SdcliError (each with its exit status); views only draw (they raise nothing), and no
    code steers by KeyError."""
    import ast
    import importlib

    import sdcli

    for path in (ROOT / "sdcli").glob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            importlib.import_module(f"sdcli.{path.stem}")

    def subclasses(cls):
        return {cls, *(s for c in cls.__subclasses__() for s in subclasses(c))}

    assert {cls.__module__ for cls in subclasses(sdcli.SdcliError)} == {"sdcli.errors"}
    raises = [node.lineno for node in ast.walk(ast.parse((ROOT / "sdcli" / "views.py").read_text()))
              if isinstance(node, ast.Raise)]
    assert not raises, f"views.py raises at lines {raises}"
    for path in (ROOT / "sdcli").glob("*.py"):
        assert "KeyError" not in path.read_text(), path


def test_options_are_frozen_values():
    """What a run is asked to do is made once and never written to: a variant is dataclasses.replace."""
    from dataclasses import FrozenInstanceError, replace

    import pytest

    from sdcli import options

    kinds = [options.Options, *options.GROUPS.values()]
    assert all(kind.__dataclass_params__.frozen for kind in kinds)
    given = options.Options.make("tiny", prompts=["a cat"], steps=2, fuse_qkv=True)
    with pytest.raises(FrozenInstanceError):
        given.work.seed = 1
    variant = replace(given, speed=replace(given.speed, fuse_qkv=False))
    assert given.speed.fuse_qkv and not variant.speed.fuse_qkv and variant.sampling is given.sampling
    assert list(given.flat()) == list(options.FLAT) and given.flat()["prompts"] == ["a cat"]


def test_the_cli_is_a_client_of_the_public_api():
    """The commands parse, call sdcli's public API and draw (views); errors give the exit status. Nothing else."""
    assert import_graph()["sdcli.cli"] <= {"sdcli", "sdcli.api", "sdcli.views", "sdcli.errors"}
