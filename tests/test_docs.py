"""The front page stays a front page and every page it leads to exists: README holds what a
newcomer needs (what it is, the two commands, the results table, links), the manual lives in
docs/, and no relative link of README or docs/ points at a file that is not there."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Pages the front page must lead to (issue 34: getting started on your data, methods,
# accelerators and pods, architecture, results).
PAGES = (
    "docs/getting_started.md",
    "docs/methods.md",
    "docs/accelerators.md",
    "docs/architecture.md",
    "docs/results.md",
)


def test_readme_is_a_front_page_that_links_every_manual_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150, "README.md grew back into a manual: move it to docs/"
    for heading in ("## Results", "## Methods", "## Two commands", "## Documentation"):
        assert heading in text
    linked = set(LINK.findall(text))
    assert set(PAGES) <= linked, sorted(set(PAGES) - linked)


def test_every_relative_link_of_readme_and_docs_exists():
    missing = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).resolve().exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_every_coco_recipe_docstring_gives_its_command_with_the_weights_flag():
    """Issue 27 item 4: each COCO recipe's docstring gives the full command that trains it,
    naming its own file and the ImageNet weights it refuses to train without."""
    import ast

    recipes = sorted((REPO / "experiments").glob("*coco*.py"))
    assert len(recipes) >= 20
    for recipe in recipes:
        doc = ast.get_docstring(ast.parse(recipe.read_text())) or ""
        name = f"experiments/{recipe.name}"
        assert f"instseg-jax train --config {name}" in doc, f"{name}: no train command"
        assert "--config.model.backbone_weights=" in doc, f"{name}: no weights flag"
