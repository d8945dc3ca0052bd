"""The DVC plot templates (.dvc/plots/*.json) rendered in a real browser, the way `dvc plots show` renders them:
the offline HTML template with vega inlined, the data DVC substitutes, the SVG the page draws."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ROOT
from tests.test_app import browser_or_skip

pytestmark = pytest.mark.e2e
LABELS_JS = "[...document.querySelectorAll('#plot svg .role-legend-label text')].map(t => t.textContent)"
BOUNDS_JS = """(() => { const svg = document.querySelector('#plot svg').getBoundingClientRect();
  return [...document.querySelectorAll('#plot svg .role-legend-label text')].every(t => {
    const r = t.getBoundingClientRect();
    return r.left >= svg.left - 0.5 && r.right <= svg.right + 0.5 && r.top >= svg.top - 0.5 && r.bottom <= svg.bottom + 0.5; }); })()"""


def filled_spec(name: str, x: str, y: str, revs: list[str]) -> dict:
    """The template with DVC's placeholders filled as `dvc plots show` fills them (rev, curve and the x/y fields)."""
    text = (ROOT / f".dvc/plots/{name}.json").read_text()
    for key, value in {"<DVC_METRIC_X>": x, "<DVC_METRIC_Y>": y, "<DVC_METRIC_X_LABEL>": x, "<DVC_METRIC_Y_LABEL>": y,
                       "<DVC_METRIC_TITLE>": f"d2dprompt sample image {name.upper()}"}.items():
        text = text.replace(key, value)
    rows = [{"rev": rev, "curve": f"AUROC 0.{685 + i} (pooled)", x: t, y: t ** (0.5 + i), "prevalence": 0.3}
            for i, rev in enumerate(revs) for t in (0.0, 0.25, 0.5, 1.0)]
    return json.loads(text.replace('"<DVC_METRIC_DATA>"', json.dumps(rows)))


@pytest.mark.parametrize(("name", "x", "y"), [("roc", "fpr", "tpr"), ("pr", "recall", "precision")])
def test_curve_legends_show_whole_labels_inside_the_picture(name, x, y, tmp_path):
    chromium = browser_or_skip()
    from playwright.sync_api import sync_playwright

    relative = re.search(r"html_template\s*=\s*(\S+)", (ROOT / ".dvc/config").read_text()).group(1)
    template = ((ROOT / ".dvc") / relative).resolve().read_text()
    revs = ["workspace", "exp-6f1d2-sharpness-0.3", "bootstrap-paired-baseline"]  # experiment names make long labels
    spec = filled_spec(name, x, y, revs)
    plot = f"<div id='plot'></div><script>vegaEmbed('#plot', {json.dumps(spec)}, {{renderer: 'svg'}}).then(() => window.drawn = true);</script>"
    page_file = tmp_path / "plots.html"
    page_file.write_text(template.replace("{plot_divs}", plot))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(page_file.as_uri())
        page.wait_for_function("window.drawn === true", timeout=30_000)
        labels = page.evaluate(LABELS_JS)
        inside = page.evaluate(BOUNDS_JS)
        browser.close()
    assert sorted(labels) == sorted(f"{rev}: AUROC 0.{685 + i} (pooled)" for i, rev in enumerate(revs))  # none cut with "…"
    assert inside, f"{name}: a legend label lies outside the picture"


def render(name: str, rows: list[dict], x: str, y: str, tmp_path) -> list[str]:
    """The y-axis labels of `name`'s template drawn over `rows` in chromium."""
    chromium = browser_or_skip()
    from playwright.sync_api import sync_playwright

    text = (ROOT / f".dvc/plots/{name}.json").read_text()
    for key, value in {"<DVC_METRIC_X>": x, "<DVC_METRIC_Y>": y, "<DVC_METRIC_X_LABEL>": x, "<DVC_METRIC_Y_LABEL>": y, "<DVC_METRIC_TITLE>": name}.items():
        text = text.replace(key, value)
    spec = json.loads(text.replace('"<DVC_METRIC_DATA>"', json.dumps(rows)))
    relative = re.search(r"html_template\s*=\s*(\S+)", (ROOT / ".dvc/config").read_text()).group(1)
    template = ((ROOT / ".dvc") / relative).resolve().read_text()
    plot = f"<div id='plot'></div><script>vegaEmbed('#plot', {json.dumps(spec)}, {{renderer: 'svg'}}).then(() => window.drawn = true);</script>"
    (tmp_path / f"{name}.html").write_text(template.replace("{plot_divs}", plot))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((tmp_path / f"{name}.html").as_uri())
        page.wait_for_function("window.drawn === true", timeout=30_000)
        labels = page.evaluate("[...document.querySelectorAll('#plot svg .role-axis-label text')].map(t => t.textContent)")
        browser.close()
    return labels


def test_the_comparison_plots_draw_every_method_and_pair_with_whole_labels(tmp_path):
    """compare's two plots (dvc.yaml: strip for per-image AUPIMO, intervals for the paired differences)."""
    rev = "exp-6f1d2-sharpness-0.3"
    strip = [{"rev": rev, "method": m, "category": "weave", "image_path": f"weave/test/hole/{i:03d}.png", "aupimo": 0.1 * i}
             for m in ("d2dprompt", "decodiff") for i in range(5)]
    assert {f"{rev}: d2dprompt", f"{rev}: decodiff"} <= set(render("strip", strip, "aupimo", "method", tmp_path))
    pairs = [{"rev": rev, "pair": "d2dprompt - decodiff", "metric": m, "diff": -0.1, "lo": -0.2, "hi": 0.01, "p_value": 0.08}
             for m in ("image_AUROC", "AUPIMO")]
    assert {f"{rev}: d2dprompt - decodiff, image_AUROC", f"{rev}: d2dprompt - decodiff, AUPIMO"} <= set(render("intervals", pairs, "diff", "pair", tmp_path))
