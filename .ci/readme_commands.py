#!/usr/bin/env python3
"""Print the shell commands of one README section, exactly as the README shows them (standard library only: CI
runs it before any virtualenv exists).

    python3 .ci/readme_commands.py "Quick start"      # the first ```bash block under "## Quick start"

CI runs what this prints, line by line, so the README's commands and CI's cannot drift apart.
"""

from __future__ import annotations

import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def section_commands(section: str, readme: str = README) -> list[str]:
    """The non-empty lines of the first ```bash block of the README section headed ``## <section>``."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    heading = re.search(rf"^## {re.escape(section)}\s*$", text, flags=re.MULTILINE)
    if heading is None:
        raise SystemExit(f"{readme}: no section '## {section}'")
    body = text[heading.end():]
    next_heading = re.search(r"^## ", body, flags=re.MULTILINE)
    body = body[:next_heading.start()] if next_heading else body
    block = re.search(r"^```bash\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)
    if block is None:
        raise SystemExit(f"{readme}: section '## {section}' has no ```bash block")
    return [line for line in block.group(1).splitlines() if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print("\n".join(section_commands(sys.argv[1])))
