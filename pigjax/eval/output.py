"""Writing results: a benchmark's JSON, or an evaluation's `<stem>.json` and `<stem>.md` side by side."""

from __future__ import annotations

import json
import os


def _dump(path: str, result: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def write_json(path: str, result: dict):
    """Write `result` to `path` (creating the directory) and say so."""
    _dump(path, result)
    print(f"wrote {path}")


def write_json_and_markdown(stem: str, result: dict, markdown: str):
    """Print the Markdown table and write `stem`.json / `stem`.md (creating the directory)."""
    print(markdown)
    _dump(stem + ".json", result)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {stem}.json/.md")
