"""What a fresh clone holds: outputs people make are ignored, the promised folders and licence are there."""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_outputs_of_the_readmes_commands_are_ignored_and_the_stages_readme_is_not():
    for made in ("predictions/x_overlay.png", "dvc_plots/index.html", "stages/latents/sample/index.csv", ".venv/bin/python"):
        assert git("check-ignore", "-q", made).returncode == 0, made
    assert git("check-ignore", "-q", "stages/README.md").returncode == 1  # the layout's promised folder exists in a clone


def test_the_licence_pyproject_names_is_there():
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    readme = (ROOT / "stages/README.md").read_text()
    assert all(f"`{name}/" in readme for name in ("download", "latents", "queries", "train", "evaluate"))


def test_dvc_plots_render_from_a_template_with_vega_inlined():
    """`dvc plots show` reads .dvc/config's html_template: vega, vega-lite and vega-embed inlined, no CDN."""
    import re

    config = (ROOT / ".dvc/config").read_text()
    relative = re.search(r"html_template\s*=\s*(\S+)", config).group(1)
    template = ((ROOT / ".dvc") / relative).resolve().read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC puts its CDN script tags where {scripts} is
    assert re.findall(r'<script data-package="([^"]+)">', template) == ["vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"]
    assert not re.search(r"<script[^>]*\bsrc=", template)
    for name in ("roc", "pr", "losses"):
        assert "<DVC_METRIC_DATA>" in (ROOT / f".dvc/plots/{name}.json").read_text()
