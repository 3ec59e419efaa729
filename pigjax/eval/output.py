"""Writing an evaluation's results: `<stem>.json` and `<stem>.md` side by side."""

from __future__ import annotations

import json
import os


def write_json_and_markdown(stem: str, result: dict, markdown: str):
    """Print the Markdown table and write `stem`.json / `stem`.md (creating the directory)."""
    print(markdown)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {stem}.json/.md")
