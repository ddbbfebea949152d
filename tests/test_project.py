"""The project's promises about itself: README commands, CI, changelog."""

from conftest import ROOT

TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && ./install.sh test && python -m pytest"


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
