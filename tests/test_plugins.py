"""Plug-ins are isolated and judged: a faulty one is a verdict, never the end of a command; auto's plan follows
their versions; auto never serves a kernel that compare would fail; doctor --probe says why a kernel is wrong."""

import re

from conftest import make_plugin

TINY = ["-m", "tiny", "--steps", "1", "--seed", "1"]

BASE = """
    import torch
    from sdcli.backends import Backend

    def attention(q, k, v, attn_mask=None, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale).transpose(1, 2)
"""


def test_a_broken_plugin_is_a_verdict_not_the_end_of_the_command(cli, tmp_path, plugins, monkeypatch):
    make_plugin(tmp_path, "faulty", BASE + """
    def check_that_raises(machine, shape):
        raise RuntimeError("driver query failed")

    def kernel_that_raises(q, k, v, attn_mask=None, scale=None):
        raise RuntimeError("no kernel image is available for execution on the device")

    backends = [Backend("bad-check", "a check that raises", attention=attention, checks=[check_that_raises]),
                Backend("bad-kernel", "a kernel that raises", attention=kernel_that_raises)]
    """, {"faulty": "backends"})
    plugins(tmp_path)
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    rows = {r["backend"]: r for r in cli.json("doctor")["verdicts"]["backends"]}
    assert rows["bad-check"]["status"] == "broken install"
    assert rows["bad-check"]["reason"].startswith("broken plug-in: its check check_that_raises raised RuntimeError")
    assert rows["bad-check"]["fix"] == "fix or uninstall faulty"
    cli("generate", "a cat", *TINY, "--backend", "sdpa", "-o", tmp_path / "sdpa")
    for e in cli.json("generate", "a cat", *TINY, "-o", tmp_path / "auto")["tuning"]["shapes"]:
        measured = {m["backend"]: m for m in e["measurements"]}
        assert "bad-check" not in measured  # its verdict is not usable: never a candidate
        assert "no kernel image" in measured["bad-kernel"]["error"] and e["choice"] in ("sdpa", "sdpa-flash")
    named = cli("generate", "a cat", *TINY, "--backend", "bad-check", "-o", tmp_path / "named", code=2)
    assert "can't run here (broken install): broken plug-in" in named.stderr and "Traceback" not in named.stderr


def test_plan_follows_the_plugins_version_and_its_editable_source(cli, tmp_path, plugins, monkeypatch):
    source = BASE + """
    backend = Backend("versioned", "a kernel author's attention", attention=attention)
    """
    folder = tmp_path / "site"
    folder.mkdir()
    make_plugin(folder, "versioned", source, {"versioned": "backend"}, version="1.0.0")
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))

    def plan():
        plugins(folder)  # as a new process finds the installed plug-in
        return cli.json("generate", "a cat", *TINY, "-o", tmp_path / "out")["tuning"]

    first = plan()
    assert first["cached"] is False and "versioned@versioned==1.0.0" in first["key"]["plugins"]
    assert plan()["cached"] is True
    # 1.0.1 is 0.3 % off: measured again, and now it fails its bound everywhere
    make_plugin(folder, "versioned", source.replace("scale=scale).transpose(1, 2)", "scale=scale).transpose(1, 2) * 1.003"),
                {"versioned": "backend"}, version="1.0.1")
    upgraded = plan()
    assert upgraded["cached"] is False and "versioned@versioned==1.0.1" in upgraded["key"]["plugins"]
    assert all(not m["ok"] for e in upgraded["shapes"] for m in e["measurements"] if m["backend"] == "versioned")
    # installed editable, its code changes without a new version: the hash of its files changes the key
    make_plugin(folder, "versioned", source, {"versioned": "backend"}, version="1.0.1", editable=True)
    editable = plan()
    assert editable["cached"] is False and any(p.startswith("versioned@versioned==1.0.1+src.")
                                               for p in editable["key"]["plugins"])
    make_plugin(folder, "versioned", source + "\n# edited\n", {"versioned": "backend"}, version="1.0.1", editable=True)
    assert plan()["cached"] is False


def test_auto_never_serves_a_kernel_that_returns_a_stale_buffer(cli, tmp_path, plugins, monkeypatch):
    """Right on its first call at a shape, then the same output whatever the inputs (and so the fastest)."""
    make_plugin(tmp_path, "stale", BASE + """
    first = {}

    def stale(q, k, v, attn_mask=None, scale=None):
        key = (q.shape, k.shape, q.dtype)
        if key not in first:
            first[key] = attention(q, k, v, attn_mask, scale)
        return first[key]

    backend = Backend("stale", "returns its first result again", attention=stale)
    """, {"stale": "backend"})
    plugins(tmp_path)
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    data = cli.json("generate", "a cat", *TINY, "-o", tmp_path / "out")
    for e in data["tuning"]["shapes"]:
        stale = next(m for m in e["measurements"] if m["backend"] == "stale")
        assert not stale["ok"] and "rounding, bound 2×" in stale["why"], stale
    assert "stale" not in data["attention"]["served"]
    compare = cli("compare", *TINY, "--backends", "stale", "--json", "-o", tmp_path / "cmp", code=1)
    assert "stale" in compare.stderr


def test_probe_gives_the_true_reason_for_a_finite_but_wrong_kernel(cli, tmp_path, plugins):
    make_plugin(tmp_path, "unscaled", BASE + """
    def unscaled(q, k, v, attn_mask=None, scale=None):
        return attention(q, k, v, attn_mask, scale=1.0)  # forgot the 1/sqrt(d)

    backend = Backend("unscaled", "attention without its scale", attention=unscaled)
    """, {"unscaled": "backend"})
    plugins(tmp_path)
    out = cli("doctor", "--probe", "--family", "vae", env={"COLUMNS": "200"}).stdout
    rows = [line for line in out.splitlines() if line.startswith("│ unscaled") and " fp32 " in line]
    assert rows and all("× rounding, bound 2×" in line for line in rows), out
    assert "non-finite" not in out
    # the verdict is the probe's, and a failed row shows no speed
    verdict = next(line for line in out.splitlines() if line.startswith("│ unscaled") and "failed the probe" in line)
    assert "usable" not in verdict
    assert all(re.search(r"bound 2×\s*│\s*│\s*│$", line) for line in rows), rows


def test_a_plugins_own_package_shows_in_doctor_with_its_version(cli, tmp_path, plugins):
    """A plug-in declares the package it needs as a built-in does: the report probes it, doctor lists it with its
    version, and its package check sees it installed."""
    make_plugin(tmp_path, "ownkernel", BASE + """
    from sdcli.backends import Package

    backend = Backend("own", "a kernel in a package of its own", attention=attention,
                      package=Package("ownkernel", ("ownkernel",), "ownkernel", min_version="2.0"))
    """, {"own": "backend"}, version="2.5")
    plugins(tmp_path)
    data = cli.json("doctor")
    assert data["report"]["packages"]["ownkernel"] == {"version": "2.5", "import_ok": True, "error": None}
    assert next(r for r in data["verdicts"]["backends"] if r["backend"] == "own")["status"] == "usable"
    table = cli("doctor", env={"COLUMNS": "200"}).stdout
    assert re.search(r"│ ownkernel\s+│ 2\.5\s+│ ok", table), table


def test_a_new_builtin_backend_is_one_declaration(cli, tmp_path, declare_builtin, monkeypatch):
    """One more declaration among sdcli's own, and nothing else: doctor's table and the report list its package,
    auto's measured plans are keyed by that package's version, and auto's documented order has it at its rank."""
    import importlib.metadata

    from conftest import sdpa
    from sdcli.backends import Backend, Package

    declare_builtin(Backend("newkernel", "a new kernel", attention=sdpa, auto_rank=105,  # sdpa's is 110
                            package=Package("safetensors", ("safetensors",), "safetensors")))
    version = importlib.metadata.version("safetensors")
    data = cli.json("doctor")
    assert data["report"]["packages"]["safetensors"]["version"] == version
    assert next(r for r in data["verdicts"]["backends"] if r["backend"] == "newkernel")["origin"] == "sdcli"
    assert re.search(rf"│ safetensors\s+│ {re.escape(version)}\s+│ ok", cli("doctor", env={"COLUMNS": "200"}).stdout)
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    run = cli.json("generate", "a cat", *TINY, "-o", tmp_path)
    assert run["tuning"]["key"]["versions"]["safetensors"] == version
    assert run["attention"]["chain"] == ["newkernel", "sdpa"]  # auto's order on the CPU
