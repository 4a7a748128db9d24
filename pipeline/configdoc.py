"""docs/config.md, written from the config dataclasses themselves (they are the schema).

Every table and key comes from the dataclass fields, with its default, its kind (extraction settings:
value, policy or runtime, from `extract.settings`) and the comment written beside the field in the
source. `make docs` rewrites the file; `tests/pipeline/test_configdoc.py` fails when it is out of date.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize

from emollama.extract import settings as S

HEADER = """# Configuration reference

Written from the config dataclasses by `make docs` (`emollama.pipeline.configdoc`); a test fails when
this file and the code disagree. Both configs are TOML files; every problem in one is listed at once,
and the resolved config is saved beside every store (per feature set) and every run (`config.json`).
Command-line flags override the file (`emollama extract --help`, `emollama train --help`).

Kinds of extraction settings: **value** changes feature values and is part of the feature-set key (a
changed value makes new sets, never mixes with the old); **policy** decides which clips get features or
what is recorded, never a value; **runtime** says where and how the work runs.
"""


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment written beside it (or on comment lines right above it), in cls or a base."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments: dict[int, tuple[str, bool]] = {}     # row -> (text, the line holds only the comment)
        fields_at: dict[int, str] = {}
        prev = None
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
            if (prev is not None and prev.type == tokenize.NAME and prev.start[1] == 4 and tok.type == tokenize.OP
                    and tok.string == ":" and tok.start[0] == prev.start[0]):
                fields_at[prev.start[0]] = prev.string
            prev = tok
        for row, name in fields_at.items():
            text, only = comments.get(row, ("", False))
            if not text or only:
                above, r = [], row - 1
                while r in comments and comments[r][1]:
                    above.insert(0, comments[r][0])
                    r -= 1
                text = " ".join(above)
            if text:
                out[name] = text
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(v):
        return "(table)"
    if isinstance(v, tuple):
        v = list(v)
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v).replace("'", '"')


def _type(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return re.sub(r"\s+", " ", str(t)).replace("|", "\\|")


def _table(title: str, cls: type, *, kinds: bool, skip: tuple[str, ...] = (),
           heading: str | None = None) -> tuple[list[str], list]:
    """The markdown table of one section, and the nested sections (fields holding a dataclass)."""
    notes = _comments(cls)
    doc = inspect.getdoc(cls) or ""
    lines = [heading or f"### `[{title}]`", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
    head = "| key | type | default | kind | note |" if kinds else "| key | type | default | note |"
    lines += [head, "|---|---|---|---|---|" if kinds else "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name in skip:
            continue
        sub = S.meta(f).get("cls") if kinds else None
        if sub is None and f.default_factory is not dataclasses.MISSING:
            probe = f.default_factory()
            sub = type(probe) if dataclasses.is_dataclass(probe) else None
        if sub is not None:
            nested.append((f"{title}.{f.name}", sub))
            continue
        note = notes.get(f.name, "").replace("|", "\\|")
        row = [f"`{f.name}`", f"`{_type(f)}`", f"`{_default(f)}`"]
        if kinds:
            row.append(S.meta(f).get("kind", ""))
        lines.append("| " + " | ".join(row + [note]) + " |")
    return lines + [""], nested


def _walk(title: str, cls: type, *, kinds: bool, skip: tuple[str, ...] = ()) -> list[str]:
    lines, nested = _table(title, cls, kinds=kinds, skip=skip)
    for sub_title, sub in nested:
        lines += _walk(sub_title, sub, kinds=kinds)
    return lines


def render() -> str:
    from emollama.extract.encoders import EncoderTable
    from emollama.extract.registry import ENCODERS
    from emollama.pipeline.config import Config
    from emollama.train.config import TrainConfig

    out = [HEADER, "## Extraction (`emollama extract -c FILE.toml`)", ""]
    for f in dataclasses.fields(Config):
        out += _walk(f.name, f.default_factory().__class__, kinds=f.name == "extract", skip=("encoders",))
    out += ["### `[extract.encoders.NAME]`", "",
            "One table per named encoder. NAME is a paper view (`audio`, `local`, `temporal`, `global`: overrides "
            "the profile's weights) or a new name (then `encoder` is required, e.g. `\"hf\"`); the sets it makes "
            "are `NAME.<encoder>.<output>`. All of it is part of the set key.", "",
            "| key | type | default | note |", "|---|---|---|---|"]
    notes = _comments(EncoderTable)
    for f in dataclasses.fields(EncoderTable):
        if f.name == "options":
            continue
        note = notes.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{f.name}` | `{_type(f)}` | `{_default(f)}` | {note} |")
    out.append("")
    for name in sorted(ENCODERS):
        opts = ENCODERS[name].Options
        if opts is None:
            continue
        lines, _ = _table("", opts, kinds=True, heading=f'### `[extract.encoders.NAME]` with `encoder = "{name}"`')
        out += lines
    out += ["## Training (`emollama train -c FILE.toml`)", ""]
    for f in dataclasses.fields(TrainConfig):
        probe = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(probe):
            out += _walk(f.name, type(probe), kinds=False)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys
    from pathlib import Path

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/config.md")
    target.write_text(render())
    print(f"wrote {target}")
