"""MkDocs hook: publish the repository files that the pages link to outside docs/.

The pages link to files such as ``../deploy/grafana-dashboard.json`` so that the links work when
the Markdown is read in the repository. Without this hook those targets are not part of the
site, and ``mkdocs build --strict`` fails on them. Each file below is added under the same
``../<path>`` name the links use, so MkDocs resolves and checks those links as usual, and it is
written to the site at the given place.

A Markdown file becomes a page. Its own links into ``docs/`` (``../docs/x.md``) are rewritten to
the docs root (``/x.md``, which ``validation.links.absolute_links: relative_to_docs`` resolves
and checks) because the page is not inside docs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

# Repository path -> where it lands in the site.
PUBLISHED = {
    "deploy/grafana-dashboard.json": "deploy/grafana-dashboard.json",
    "deploy/prometheus-alerts.yml": "deploy/prometheus-alerts.yml",
    "benchmarks/README.md": "benchmarks/running/index.html",
}


# Set explicitly: by default MkDocs would exclude these paths, which start with a dot.
INCLUDED = InclusionLevel.INCLUDED


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Add each file of ``PUBLISHED`` to the site."""
    root = Path(config.config_file_path).parent
    for repo_path, site_path in PUBLISHED.items():
        source = root / repo_path
        src_uri = f"../{repo_path}"
        if source.suffix == ".md":
            text = source.read_text(encoding="utf-8").replace("](../docs/", "](/")
            file = File.generated(config, src_uri, content=text, inclusion=INCLUDED)
        else:
            file = File.generated(config, src_uri, abs_src_path=str(source), inclusion=INCLUDED)
        file.dest_uri = site_path
        files.append(file)
    return files
