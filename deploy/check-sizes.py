#!/usr/bin/env python3
"""Reports Rust functions over 100 lines and source files over 600 lines (not counting a
file's `#[cfg(test)]` module, nor tests/, benches/ and fuzz/), so that code stays readable at a
glance. Each exception allowed below names its reason; anything else fails (exit 1)."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FN, MAX_FILE = 100, 600
# path or path::function -> why it may be longer.
ALLOWED = {}

FN = re.compile(r"^(\s*)(pub(\([a-z]+\))? )?(async )?(const )?(unsafe )?fn ([a-z_0-9]+)")


def sources():
    for crate in ["src", "schemas/src", "config/src", "common/src", "gateway/src", "workers/src",
                  "learn/src", "learn/service/src", "features/src", "examples/custom-step/src"]:
        yield from sorted((ROOT / crate).rglob("*.rs"))


def code_lines(lines):
    """Lines before the file's test module."""
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]") and i + 1 < len(lines) and "mod " in lines[i + 1]:
            return lines[:i]
    return lines


def long_functions(lines):
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if lines[j].startswith(indent + "}") and not lines[j].startswith(indent + "} else"):
                if j - i + 1 > MAX_FN:
                    yield m.group(7), j - i + 1
                break


def main():
    problems = []
    for path in sources():
        rel = str(path.relative_to(ROOT))
        lines = code_lines(path.read_text().splitlines())
        if len(lines) > MAX_FILE and rel not in ALLOWED:
            problems.append(f"{rel}: {len(lines)} lines (over {MAX_FILE})")
        for name, n in long_functions(lines):
            if f"{rel}::{name}" not in ALLOWED:
                problems.append(f"{rel}::{name}: {n} lines (over {MAX_FN})")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"sizes: no function over {MAX_FN} lines, no file over {MAX_FILE} "
          f"({len(ALLOWED)} exceptions, each with its reason)")


if __name__ == "__main__":
    main()
