#!/usr/bin/env python3
"""Checks the README and docs/: every relative link names a file that exists (and, with an
anchor, a heading in it), and the README stays a front door (at most 250 lines)."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path):
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            out.add(title.replace(" ", "-"))
    return out


def main():
    problems = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                problems.append(f"{page.relative_to(ROOT)}: link to missing {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.relative_to(ROOT)}: no heading for {target}")
    readme_lines = len((ROOT / "README.md").read_text().splitlines())
    if readme_lines > 250:
        problems.append(f"README.md: {readme_lines} lines (a front door has at most 250)")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"docs: {len(pages)} pages, every link resolves; README {readme_lines} lines")


if __name__ == "__main__":
    main()
