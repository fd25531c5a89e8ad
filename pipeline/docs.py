"""docs/config.md, the config reference, generated from the config models so it cannot drift.

Each key's type, default and limits come from the pydantic models in `pipeline/config.py`;
its meaning is the key's `Field(description=...)`, else its end-of-line comment, else the
comment lines right above it, read from the source with `ast` and `tokenize`. So the
comments stay in one place, beside the keys. `make docs` (`python -m pipeline.docs`)
rewrites the file; `python -m pipeline.docs --check` (and tests/test_docs.py) fails when
the committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from pathlib import Path

from pydantic import BaseModel

from pipeline import atomic
from pipeline import config as config_mod

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
HEADER = """\
# Config reference

<!-- Generated from pipeline/config.py by `make docs` (python -m pipeline.docs): edit the
comments there, not this file. -->

Every key is optional. A YAML file (`CONFIG=...`) sets keys by section, e.g.
`train: {epochs: 3}`; `SET="train.epochs=3"` (`--set train.epochs=3`) overrides one.
An unknown key, a wrong type or a value out of range stops the run with exit code 2 and
one line naming the key. `imdb-pipeline check-config --config X` prints the resolved
config.
"""


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """Line number -> end-of-line comment, and line number -> whole-line comment."""
    trailing, whole = {}, {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.start[0] in code_lines else whole)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return trailing, whole


def field_notes(source: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Class name -> field name -> (annotation as written, comment) for every annotated field."""
    trailing, whole = _comments(source)
    notes: dict[str, dict[str, tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = notes.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            comment = " ".join(trailing[n] for n in lines if n in trailing)
            if not comment:  # a comment block right above the key
                above, n = [], stmt.lineno - 1
                while n in whole:
                    above.insert(0, whole[n])
                    n -= 1
                comment = " ".join(above)
            fields[stmt.target.id] = (ast.get_source_segment(source, stmt.annotation) or "", comment)
    return notes


def _limits(metadata: list) -> list[str]:
    out = []
    for item in metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                out.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "pattern", None):
            out.append(f"matches `{item.pattern}`")
    return out


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str, notes: dict, names: list[str]) -> list[str]:
    written = notes.get(model.__name__, {})
    rows = []
    for name in names:
        field = model.model_fields[name]
        annotation, comment = written.get(name, (str(field.annotation), ""))
        kind = ", ".join([f"`{annotation}`"] + _limits(field.metadata))
        meaning = field.description or comment
        rows.append(f"| `{prefix}{name}` | {_cell(kind)} | `{_cell(_default(field))}` | {_cell(meaning)} |")
    return rows


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def render(source: str | None = None, root: type[BaseModel] = config_mod.Config) -> str:
    """The whole reference: the top-level keys, then one table per section."""
    source = source if source is not None else Path(config_mod.__file__).read_text()
    notes = field_notes(source)
    head = "| key | type | default | meaning |\n| --- | --- | --- | --- |"
    sections = [n for n, f in root.model_fields.items() if _is_section(f)]
    scalars = [n for n in root.model_fields if n not in sections]
    parts = [HEADER, "## Top level\n", head, *_rows(root, "", notes, scalars)]
    for name in sections:
        section = root.model_fields[name].annotation
        parts += [f"\n## {name}\n", head, *_rows(section, f"{name}.", notes, list(section.model_fields))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    parser.add_argument("--out", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
