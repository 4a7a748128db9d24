"""The adapter contract and the registry.

An `Adapter` declares everything the rest of the house needs to know about a dataset: its name, its
label set, its splits (and folds, for DFEW), whether its clips have sound, its options (a frozen
dataclass, whose fields are the only option names accepted) and the function that reads it.
`ADAPTERS` maps names to adapters; `corpora/__init__.py` registers the built-in ones explicitly, and
`register(adapter)` adds another at run time. `load_corpus(name, root, **options)` reads any of them.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Iterator, Mapping as AbcMapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from .base import Corpus, DatasetError, source_has_sound


class Sound(str, Enum):
    """Whether an adapter's clips have sound for the audio view (each clip's `Clip.has_sound`)."""

    ALWAYS = "always"        # video files
    NEVER = "never"          # folders of frames
    PER_CLIP = "per-clip"    # either: a video file has sound, a folder of frames has none

    def of(self, source: Path) -> bool:
        """`Clip.has_sound` for a clip read from `source`."""
        if self is Sound.ALWAYS:
            return True
        if self is Sound.NEVER:
            return False
        return source_has_sound(source)


O = TypeVar("O")


@dataclass(frozen=True)
class Adapter(Generic[O]):
    """A dataset: what it is (declarations) and how to read it (`read(root, options) -> Corpus`)."""

    name: str
    read: Callable[[Path, O], Corpus]
    options: type[O]                  # a frozen dataclass; its fields are the adapter's options
    labels: tuple[str, ...]           # the label set; () when the data itself names them (folder)
    splits: tuple[str, ...]           # the splits its clips carry by default
    sound: Sound
    folds: tuple[int, ...] = ()       # cross-validation folds, chosen by the `fold` option (DFEW: 1..5)
    fixed_labels: bool = False        # evaluation scores every label of the set (the benchmark's protocol)
    benchmark: bool = False           # `emollama eval --dataset NAME` evaluates it
    summary: str = ""

    def __post_init__(self) -> None:
        if not is_dataclass(self.options):
            raise TypeError(f"adapter {self.name!r}: options must be a dataclass type, got {self.options!r}")
        if self.folds and "fold" not in {f.name for f in fields(self.options)}:
            raise TypeError(f"adapter {self.name!r} declares folds but its options have no `fold` field")

    def option_defaults(self) -> dict[str, Any]:
        return {f.name: (f.default if f.default is not MISSING else
                         f.default_factory() if f.default_factory is not MISSING else None)
                for f in fields(self.options)}

    def make_options(self, values: Mapping[str, Any] | None = None) -> O:
        """The options dataclass from `values` (a config's `[dataset] options`, or `--option KEY=VALUE`
        strings, converted to each field's type); an unknown name or a bad value is a `DatasetError`."""
        values = dict(values or {})
        known = [f.name for f in fields(self.options)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DatasetError(f"dataset {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                               f"{', '.join(known) or 'none'} (see `emollama datasets`)")
        hints = typing.get_type_hints(self.options)
        return self.options(**{k: _coerce(self.name, k, v, hints[k]) for k, v in values.items()})

    def load(self, root: Path | str, **options: Any) -> Corpus:
        """Read the corpus at `root` with these options (no check that it holds any clip)."""
        return self.read(Path(root), self.make_options(options))


def _coerce(dataset: str, name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` of option `name`; strings (from the command line) are converted."""
    def bad(what: str) -> DatasetError:
        return DatasetError(f"dataset {dataset!r} option {name}={value!r}: expected {what}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in members:
            return value
        errors = []
        for m in members:
            try:
                return _coerce(dataset, name, value, m)
            except DatasetError as e:
                errors.append(e)
        raise errors[-1]
    if hint is Any:
        return value
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise bad("a string")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise bad("true or false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)) and (hint is float or float(value).is_integer()):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                pass
        raise bad("a whole number" if hint is int else "a number")
    if origin is tuple:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return tuple(_coerce(dataset, name, v, item) for v in value)
        raise bad("a comma-separated list")
    if origin in (dict, AbcMapping):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad('a JSON object, e.g. {"train": "train.txt"}') from None
        if isinstance(value, AbcMapping):
            return dict(value)
        raise bad('a JSON object, e.g. {"train": "train.txt"}')
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise bad(getattr(hint, "__name__", str(hint)))


class Registry(AbcMapping):
    """Dataset name -> `Adapter`, in registration order (a read-only mapping plus `register`/`remove`)."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}

    def register(self, *adapters: Adapter, replace: bool = False) -> Adapter:
        """Add adapters; a name already taken is an error unless `replace`. Returns the last one."""
        for a in adapters:
            if not isinstance(a, Adapter):
                raise TypeError(f"register() takes Adapter objects, got {a!r}")
            if a.name in self._adapters and not replace:
                raise ValueError(f"a dataset named {a.name!r} is already registered: choose another name "
                                 "or pass replace=True")
            self._adapters[a.name] = a
        return adapters[-1]

    def remove(self, name: str) -> Adapter:
        return self._adapters.pop(name)

    def __getitem__(self, name: str) -> Adapter:
        return self._adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._adapters))

    def __len__(self) -> int:
        return len(self._adapters)

    def benchmarks(self) -> tuple[str, ...]:
        """The datasets `emollama eval` evaluates."""
        return tuple(n for n, a in self._adapters.items() if a.benchmark)

    def with_folds(self) -> tuple[str, ...]:
        return tuple(n for n, a in self._adapters.items() if a.folds)


ADAPTERS = Registry()
register = ADAPTERS.register


def get_adapter(name: str) -> Adapter:
    """The adapter registered as `name`; an unknown name is a `DatasetError` listing the known ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(ADAPTERS)}") from None


def load_corpus(kind: str, root: Path | str, **options: Any) -> Corpus:
    """Load a corpus by adapter name (`merr`, `mer2023`, `dfew`, `folder`, `emer`, or one registered
    later); a corpus without any clip is an error that shows the first rejections."""
    corpus = get_adapter(kind).load(root, **options)
    if not corpus.clips:
        why = "; ".join(f"{cid}: {r}" for cid, r in corpus.rejected[:3])
        raise DatasetError(f"no clips found in {root} as a {kind} dataset"
                           + (f" ({len(corpus.rejected)} rejected, e.g. {why})" if why else "")
                           + ". Check --dataset and --data.")
    return corpus


def parse_options(items: Sequence[str] = (), **flags: Any) -> dict[str, Any]:
    """Adapter options from `--option KEY=VALUE` items and named flags (`fold=...`; None = not given).
    Values stay strings here; `Adapter.make_options` converts them to the option's type."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DatasetError(f"--option {item!r}: expected KEY=VALUE (e.g. fold=2 or labels_csv=labels.csv)")
        if key in out:
            raise DatasetError(f"--option {key} is given twice: keep one")
        out[key] = value.strip()
    for key, value in flags.items():
        if value is None:
            continue
        if key in out:
            raise DatasetError(f"{key} is given both as --option {key}=... and as --{key.replace('_', '-')}: keep one")
        out[key] = value
    return out


def describe(adapter: Adapter) -> list[str]:
    """Lines that show an adapter's declarations (for `emollama datasets`)."""
    opts = ", ".join(f"{k}={v!r}" for k, v in adapter.option_defaults().items()) or "none"
    lines = [f"{adapter.name}: {adapter.summary}" if adapter.summary else adapter.name,
             f"  labels: {', '.join(adapter.labels) if adapter.labels else 'none declared'}",
             f"  splits: {', '.join(adapter.splits)}"
             + (f"; folds: {', '.join(map(str, adapter.folds))} (option fold)" if adapter.folds else ""),
             f"  sound: {adapter.sound.value}",
             f"  options: {opts}"]
    if adapter.benchmark:
        lines.append("  evaluated by `emollama eval`" + (" over its whole label set" if adapter.fixed_labels else ""))
    return lines
