"""The chart README's values table, made from the `# --` comment above each key of values.yaml.

`python deploy/values_table.py` rewrites the table between the markers in deploy/helm/README.md
(`make k8s` runs it); `undocumented()` lists keys that no comment covers.
"""

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "helm"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):")


def documented():
    """[(dotted key, description)] for every key with a `# --` comment, in file order."""
    rows, stack, comment = [], [], None
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = stripped[4:].strip()
            continue
        if stripped.startswith("#") or not stripped:
            comment = None if not stripped else comment
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match[1])
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match[2])]
        if comment:
            rows.append((".".join(k for _, k in stack), comment))
        comment = None
    return rows


def leaves(value, path=()):
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from leaves(child, (*path, str(key)))
    else:
        yield ".".join(path)


def undocumented():
    """Keys of values.yaml with no `# --` comment on themselves or an enclosing key."""
    covered = {key for key, _ in documented()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return [leaf for leaf in leaves(values) if not any(leaf == key or leaf.startswith(key + ".") for key in covered)]


def table():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = ["| key | default | description |", "| --- | --- | --- |"]
    for key, description in documented():
        value = values
        for part in key.split("."):
            value = value[part]
        default = json.dumps(value, separators=(", ", ": ")).replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {description} |")
    return "\n".join(lines)


def main():
    readme = CHART / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
