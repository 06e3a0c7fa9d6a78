"""Generated parts of the docs: rewrite them from the code, or check they match.

    .venv/bin/python scripts/docs.py          # rewrite every generated part
    .venv/bin/python scripts/docs.py --check  # exit 1 if one is out of date
    (file names after them: those files only)

Each part sits between ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``
in a page of docs/ (the reference pages), and is made from the code that the
behaviour lives in, so that nothing is written twice:

- ``config-keys``: every config key, from the key tables the validator applies
  (amqpdispatcher/config/, the JSON Schema's source too);
- ``cli-flags``: every command-line flag, from cli.build_parser();
- ``environment``: every environment variable, from contracts/environment.py;
- ``exit-statuses``: from contracts/exits.py;
- ``metrics``: from contracts/metrics.py;
- ``signals``: from contracts/signals.py.

tests/test_docs.py fails when a part is out of date, and when a key, flag,
variable, metric, status or signal exists without its entry.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from amqpdispatcher import cli  # noqa: E402
from amqpdispatcher.config.keys import _Key  # noqa: E402
from amqpdispatcher.config.top_level import TOP_LEVEL_KEYS  # noqa: E402
from amqpdispatcher.contracts import environment, exits, metrics, signals  # noqa: E402

DOCS = REPO / "docs"

_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list",
          dict: "mapping", date: "date"}
_BIG = 2**62  # bounds beyond this are AMQP's 64-bit limits: not worth a column


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(spec: _Key) -> str:
    names = [_TYPES[t] for t in spec.types if t in _TYPES]
    if "number" in names and "integer" in names:
        names.remove("integer")  # a number may be whole
    return " or ".join(dict.fromkeys(names))


def _bounds(spec: _Key) -> str:
    parts = []
    if spec.positive:
        parts.append("> 0")
    if spec.minimum is not None and abs(spec.minimum) < _BIG:
        parts.append(f">= {spec.minimum:g}")
    if spec.maximum is not None and spec.maximum < _BIG:
        parts.append(f"<= {spec.maximum}")
    if spec.non_empty:
        parts.append("not empty")
    if spec.name:
        parts.append("at most 255 bytes")
    if spec.choices:
        parts.append("one of " + ", ".join(f"`{c}`" for c in spec.choices))
    if spec.import_path:
        parts.append(f"`{spec.import_path}`")
    return "; ".join(parts)


def _default(spec: _Key) -> str:
    if spec.required:
        return "required"
    if spec.default is None:
        return ""
    if isinstance(spec.default, bool):
        return f"`{str(spec.default).lower()}`"
    return f"`{spec.default!r}`" if isinstance(spec.default, str) else f"`{spec.default}`"


def _tables(keys: dict[str, _Key], path: str) -> Iterator[str]:
    title = f"`{path}`" if path else "top level"
    yield f"### {title}\n"
    yield "| key | type | default | bounds | what |"
    yield "|---|---|---|---|---|"
    nested = []
    for name, spec in keys.items():
        yield (f"| `{name}` | {_type(spec)} | {_default(spec)} | {_cell(_bounds(spec))} | "
               f"{_cell(spec.doc)} |")
        if spec.entries is not None:
            suffix = "[]" if list in spec.types else ""
            nested.append((spec.entries, f"{path}.{name}{suffix}" if path else name + suffix))
    yield ""
    for entries, sub in nested:
        yield from _tables(entries, sub)


def config_keys() -> str:
    return "\n".join(_tables(TOP_LEVEL_KEYS, ""))


def cli_flags() -> str:
    parser = cli.build_parser()
    formatter = argparse.HelpFormatter(parser.prog, width=88)  # not the terminal's
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    usage = formatter.format_help().rstrip()
    lines = ["```", usage, "```", "", "| flag | what |", "|---|---|"]
    for action in cli.build_parser()._actions:
        flags = ", ".join(action.option_strings)
        if action.metavar:
            flags = ", ".join(f"{flag} {action.metavar}" for flag in action.option_strings)
        help_text = action.help or ""
        if isinstance(action, argparse._HelpAction):
            help_text = "show the usage and exit"
        lines.append(f"| `{flags}` | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def environment_variables() -> str:
    lines = ["| variable | default | what |", "|---|---|---|"]
    lines += [f"| `{v.name}` | {v.default} | {_cell(v.meaning)} |"
              for v in environment.VARIABLES if not v.internal]
    internal = ", ".join(f"`{v.name}`" for v in environment.VARIABLES if v.internal)
    lines += ["", f"Set by the arbiter of `--processes` for its workers, and removed from "
                  f"their environment before the consumer code runs: {internal}."]
    return "\n".join(lines) + "\n"


def metrics_table() -> str:
    lines = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for m in metrics.METRICS:
        what = ("`--processes` only: " if m.processes_only else "") + m.doc
        lines.append(f"| `{m.name}` | {m.type} | {', '.join(m.labels)} | {_cell(what)} |")
    return "\n".join(lines) + "\n"


def signals_table() -> str:
    lines = ["| signal | a process (or a worker) | the arbiter of `--processes` |",
             "|---|---|---|"]
    lines += [f"| {s.names} | {_cell(s.process)} | {_cell(s.arbiter)} |"
              for s in signals.REFERENCE]
    return "\n".join(lines) + "\n"


PARTS: dict[str, Callable[[], str]] = {
    "config-keys": config_keys,
    "cli-flags": cli_flags,
    "environment": environment_variables,
    "exit-statuses": exits.markdown_table,
    "metrics": metrics_table,
    "signals": signals_table,
}


def _region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} [^\n]*-->\n)(.*?)(<!-- /generated: {name} -->)",
                      re.S)


def generated(text: str) -> str:
    """``text`` with every generated part it holds made anew."""
    for name, make in PARTS.items():
        # A blank line after the part: a table must end before the closing comment.
        text = _region(name).sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(3),
                                 text)
    return text


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def main(argv: list[str]) -> int:
    paths = [Path(arg) for arg in argv if arg != "--check"] or pages()
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = generated(text)
        if new == text:
            continue
        if "--check" in argv:
            stale.append(path)
        else:
            path.write_text(new, encoding="utf-8")
            print(f"{path.name}: generated parts rewritten")
    for path in stale:
        print(f"{path.name}: a generated part is out of date: run "
              ".venv/bin/python scripts/docs.py", file=sys.stderr)
    return 1 if stale else 0


def signal_names() -> set[str]:
    """The names of the signals some part acts on (for tests/test_docs.py)."""
    return {signal.Signals(number).name for number in signals.HANDLED}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
