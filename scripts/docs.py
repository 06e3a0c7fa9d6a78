"""Generated parts of the docs: rewrite them from the code, or check they match.

    .venv/bin/python scripts/docs.py          # rewrite README.md's generated parts
    .venv/bin/python scripts/docs.py --check  # exit 1 if one is out of date
    (a file name after them: that file instead of README.md)

Each part sits between ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``
in README.md: today the exit-status table, from amqpdispatcher/contracts/exits.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from amqpdispatcher.contracts import exits  # noqa: E402

README = REPO / "README.md"
PARTS: dict[str, Callable[[], str]] = {"exit-statuses": exits.markdown_table}


def _region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} [^\n]*-->\n)(.*?)(<!-- /generated: {name} -->)",
                      re.S)


def generated(text: str) -> str:
    """``text`` with every generated part made anew."""
    for name, make in PARTS.items():
        pattern = _region(name)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no '<!-- generated: {name} ... -->' region")
        # A blank line after the part: a table must end before the closing comment.
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(3),
                           text)
    return text


def main(argv: list[str]) -> int:
    paths = [arg for arg in argv if arg != "--check"]
    path = Path(paths[0]) if paths else README
    text = path.read_text(encoding="utf-8")
    new = generated(text)
    if "--check" in argv:
        if new != text:
            print(f"{path.name}: a generated part is out of date: run "
                  ".venv/bin/python scripts/docs.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path.name}: generated parts rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
