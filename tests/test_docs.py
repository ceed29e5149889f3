"""The documentation site's sources: what the strict build does not check by itself.

``make docs`` (``mkdocs build --strict``) fails on broken links and anchors (checked here too).
These check the rest: every Mermaid diagram draws, in a real browser, with the copy of Mermaid
served with the site (never a CDN); the home page's code fits its column; links are titled, not
named after files.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

#: Monospace characters a code block shows without scrolling on the home page at 1280 px
#: (about 84 with Material's default fonts, measured in chromium; a margin for other fonts).
HOME_CODE_WIDTH = 80

#: A link whose text is a bare file name or path, e.g. [tasks.md](tasks.md).
FILE_NAME_LINK = re.compile(r"\[`?[\w./-]+\.(?:md|py|json|ya?ml|lua|txt)`?\]\(")


#: A page that draws every diagram with the site's Mermaid and writes the outcomes in a <pre>.
DRAW_PAGE = """<!doctype html><html><body>
<script src="%(mermaid)s"></script>
<script>
mermaid.initialize({startOnLoad: false});
const sources = %(sources)s;
(async () => {
  const out = [];
  for (const [i, source] of sources.entries()) {
    try {
      const {svg} = await mermaid.render("diagram" + i, source);
      out.push(svg.includes("<svg") ? "ok" : "no svg");
    } catch (e) {
      out.push("error: " + e.message);
    }
  }
  const pre = document.createElement("pre");
  pre.id = "result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script></body></html>
"""


def _mkdocs_config() -> dict[str, Any]:
    """mkdocs.yml, with its ``!!python/name:`` tags read as None."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    config: dict[str, Any] = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    return config


def _code_lines(markdown: str) -> list[str]:
    """The lines inside the fenced code blocks of ``markdown``."""
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def test_mermaid_blocks_are_drawn_by_a_copy_served_with_the_site() -> None:
    config = _mkdocs_config()
    fences = [
        fence
        for ext in config["markdown_extensions"]
        if isinstance(ext, dict) and "pymdownx.superfences" in ext
        for fence in ext["pymdownx.superfences"]["custom_fences"]
    ]
    assert [(f["name"], f["class"]) for f in fences] == [("mermaid", "mermaid")]
    # Material draws a diagram with the global `mermaid` when a page loaded one, and fetches
    # it from unpkg.com otherwise: the site must load its own.
    scripts = config["extra_javascript"]
    assert not [s for s in scripts if "//" in s], scripts
    [mermaid] = [DOCS / s for s in scripts if s.endswith("mermaid.min.js")]
    assert mermaid.stat().st_size > 1_000_000  # the whole library, not a stub
    assert "MIT License" in (mermaid.parent / "LICENSE").read_text()
    assert any("```mermaid" in page.read_text() for page in PAGES)


def test_every_diagram_draws_with_the_served_mermaid_in_chromium(tmp_path: Path) -> None:
    # A diagram with a syntax error shows as an error box on the page; the build never notices.
    sources = [
        source
        for page in PAGES
        for source in re.findall(r"^```mermaid\n(.*?)^```", page.read_text(), re.S | re.M)
    ]
    sources.append("flowchart LR\n    a -- broken -->\n")  # proves that errors are reported
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser is not None, "chromium is needed (apt-get install chromium; .ci/run does)"
    page = tmp_path / "draw.html"
    mermaid = (DOCS / "assets" / "vendor" / "mermaid" / "mermaid.min.js").as_uri()
    encoded = json.dumps(sources).replace("</", "<\\/")
    page.write_text(DRAW_PAGE % {"mermaid": mermaid, "sources": encoded})
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing from the network
            "--virtual-time-budget=60000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found is not None, done.stderr[-2000:]
    outcomes = json.loads(html.unescape(found.group(1)))
    assert len(outcomes) == len(sources) > 1
    assert outcomes[:-1] == ["ok"] * (len(sources) - 1)
    assert outcomes[-1].startswith("error: Parse error")


def test_the_home_page_code_fits_its_column_at_1280_px() -> None:
    lines = _code_lines((DOCS / "index.md").read_text())
    assert [line for line in lines if len(line) > HOME_CODE_WIDTH] == []


def test_link_texts_are_titles_not_file_names() -> None:
    found = [
        f"{page.name}: {match.group(0)}"
        for page in [*PAGES, ROOT / "benchmarks" / "README.md"]
        for match in FILE_NAME_LINK.finditer(page.read_text())
    ]
    assert found == []


def _left_out(directory: str, names: list[str]) -> set[str]:
    """What a copy of the repository for a docs build leaves out: VCS data, venvs, outputs."""
    return {
        name
        for name in names
        if name in {".git", "site", "build", "dist"}
        or name.endswith(("_cache", ".egg-info"))
        or (Path(directory, name) / "pyvenv.cfg").exists()
    }


def test_make_docs_fails_on_a_broken_link_and_a_broken_anchor(tmp_path: Path) -> None:
    # The command `make docs` runs, taken from the Makefile, so that a flag that hides warnings
    # from strict mode (mkdocs build --strict --quiet passes broken links) is caught.
    plan = subprocess.run(
        ["make", "-n", "-s", "docs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    [command] = [line for line in plan.splitlines() if "mkdocs build" in line]
    args = shlex.split(command)
    env = dict(os.environ)
    while "=" in args[0]:  # VAR=value before the command
        name, _, value = args.pop(0).partition("=")
        env[name] = value
    args[0] = str(ROOT / args[0])  # the repository's venv, run in the copy
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=_left_out)
    page = copy / "docs" / "contributing.md"
    page.write_text(page.read_text() + "\n[a](no-such-page.md), [b](concepts.md#no-such-heading)\n")
    done = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "'no-such-page.md', but the target is not found" in done.stderr
    assert "does not contain an anchor '#no-such-heading'" in done.stderr
