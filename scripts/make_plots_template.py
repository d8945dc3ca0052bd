"""python scripts/make_plots_template.py NPM_TARBALL_FOLDER [--out src/d2dprompt/assets/plots_offline.html]

Builds the page template `dvc plots show` renders into (.dvc/config: plots.html_template) with vega,
vega-lite and vega-embed inlined, so the plots draw with no network; DVC's own page loads them from a
CDN and stays blank offline. The versions are the ones DVC's renderer asks for. Fetch the tarballs with
`npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2` into a folder; their sha256 are checked here.
"""

from __future__ import annotations

import hashlib
import html
import io
import tarfile
from pathlib import Path

import typer

# npm package -> (version, sha256 of the npm tarball, the browser build inside it)
PACKAGES = {
    "vega": ("5.20.2", "d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d", "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b", "package/build/vega-embed.min.js"),
}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- offline: {sources}. Licences below the scripts. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
<!--
{licences}
-->
</body>
</html>
"""


def read_member(tarball: Path, member: str) -> str:
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(member)
        if data is None:
            raise typer.BadParameter(f"{tarball}: no {member}")
        return io.TextIOWrapper(data, encoding="utf8").read()


def main(folder: Path = typer.Argument(..., help="folder holding the three npm tarballs"),
         out: Path = typer.Option(Path("src/d2dprompt/assets/plots_offline.html"), help="template to write")) -> None:
    scripts, sources, licences = [], [], []
    for name, (version, sha256, member) in PACKAGES.items():
        tarball = folder / f"{name}-{version}.tgz"
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != sha256:
            raise typer.BadParameter(f"{tarball}: sha256 {digest}, expected {sha256}")
        code = read_member(tarball, member).replace("</script", "<\\/script")  # a script body may not close its tag
        scripts.append(f'    <script data-package="{name}@{version}">\n{code}\n    </script>')
        sources.append(f"{name}@{version} ({member.removeprefix('package/')}, npm tarball sha256 {sha256})")
        licences.append(f"{name}@{version}:\n" + html.escape(read_member(tarball, "package/LICENSE")).replace("--", "- -"))
    page = PAGE.format(sources="; ".join(sources), scripts="\n".join(scripts), licences="\n\n".join(licences))
    out.write_text(page, encoding="utf8")
    typer.echo(f"{out}: {len(page) / 1e6:.2f} MB, {', '.join(f'{n}@{v[0]}' for n, v in PACKAGES.items())}")


if __name__ == "__main__":
    typer.run(main)
