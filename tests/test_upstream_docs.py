"""Every place veil patches or re-composes Flower points at its upstream proposal, and every proposal it points at
exists and says what is patched, why, the Flower version tested and the change proposed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every module of the Flower wing but its gate (__init__) and its plain re-exports (names.py), and the node executor
PATCHING = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "veil/flower").glob("*.py"))
            if p.name not in ("__init__.py", "names.py")] + ["veil/client/executor.py"]


def test_each_patching_module_links_an_existing_upstream_proposal() -> None:
    assert len(PATCHING) == 8
    for module in PATCHING:
        links = re.findall(r"docs/upstream/([\w-]+\.md)", (ROOT / module).read_text(encoding="utf-8"))
        assert links, f"{module} names no docs/upstream/ proposal"
        for name in links:
            assert (ROOT / "docs/upstream" / name).is_file(), f"{module} links a missing docs/upstream/{name}"


def test_each_proposal_names_the_flower_version_why_and_the_change() -> None:
    proposals = sorted(p for p in (ROOT / "docs/upstream").glob("*.md") if p.name != "README.md")
    assert len(proposals) == 10
    index = (ROOT / "docs/upstream/README.md").read_text(encoding="utf-8")
    for path in proposals:
        text = path.read_text(encoding="utf-8")
        assert re.search(r"Tested against: flwr 1\.41\.0", text), path.name
        assert "## Why" in text and "## Proposed change" in text, path.name
        assert f"({path.name})" in index, f"docs/upstream/README.md does not list {path.name}"
