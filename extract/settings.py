"""Settings fields that say what they are: value, policy or runtime.

Every field of a settings dataclass (`FrameSettings`, `FaceSettings`, `ExtractSettings`, an encoder's
options, the pipeline's `ExtractConfig`) is declared with one of these helpers, and the dataclass IS
its config section (TOML table), defaults and checks included:

- `value(...)`   changes feature values. It goes into the spec, hence the key, of every feature set
                 whose encoder reads one of its `inputs` (spec params, under the field's name or the
                 name given for that input), or into a spec attribute (`spec="dtype"`; `spec="encoder"`:
                 the encoder puts it into its own specs: weights identity, layer, pooling, options;
                 `spec="compute"`: the sets computed on a CPU hold it, cpu_threads).
- `policy(...)`  decides which clips get features, or what is recorded about them; never a value. It is
                 not in the key, but belongs to a job's settings (eval re-extraction keeps it).
- `runtime(...)` says where and how the work runs (device, workers, batch sizes, the store): not in the
                 key, and each job sets its own.
- `section(C)`   a nested settings dataclass: its own table (`[extract.frames]`) and, in the spec params,
                 its own dict (`param`).

`spec_params(settings, input)` derives the spec params of one input kind from the value fields, so a
value field cannot be left out of the key: it must say which inputs read it (`value` refuses a field
that lands nowhere), and `tests/extract/test_settings_keys.py` changes every one of them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

VALUE, POLICY, RUNTIME, SECTION = "value", "policy", "runtime", "section"
KINDS = (VALUE, POLICY, RUNTIME, SECTION)
_META = "emollama"


def _field(kind: str, default: Any, default_factory: Any, **meta: Any):
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_META: {"kind": kind, **meta}})


def value(default: Any = MISSING, *, inputs: Sequence[str] | Mapping[str, str] = (), spec: str | None = None,
          choices: Sequence[Any] | None = None, min: float | None = None, max: float | None = None,
          default_factory: Any = MISSING, omit_default: bool = False):
    """A field that changes feature values.

    inputs: the input kinds whose spec params hold it (a mapping gives its param name per input, else
    the field's name); spec: a FeatureSpec attribute it becomes instead ("dtype"), "encoder" when
    each encoder records it in its own specs, or "compute" when the specs of the sets computed on a CPU
    hold it (`extract.step.build_specs`: cpu_threads). choices / min / max: what `problems` accepts.
    omit_default: at its default the field is left out of the spec params, so adding it kept every key
    made before (the perturbations of `[extract.perturb]`: off by default, a key of their own when on).
    """
    inputs = dict(inputs) if isinstance(inputs, Mapping) else {k: None for k in inputs}
    if not inputs and spec is None:
        raise TypeError("a value field must say where it lands in the feature spec: give `inputs` or `spec`")
    return _field(VALUE, default, default_factory, inputs=inputs, spec=spec, choices=choices, min=min, max=max,
                  omit_default=omit_default)


def policy(default: Any = MISSING, *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, default_factory: Any = MISSING):
    """A field that decides which clips get features (or what is recorded), never their values."""
    return _field(POLICY, default, default_factory, choices=choices, min=min, max=max)


def runtime(default: Any = MISSING, *, choices: Sequence[Any] | None = None, min: float | None = None,
            max: float | None = None, default_factory: Any = MISSING):
    """A field that says where and how the work runs: never in a key, set by each job."""
    return _field(RUNTIME, default, default_factory, choices=choices, min=min, max=max)


def section(cls: type, *, param: str | None = None):
    """A nested settings dataclass (its own config table); `param`: its dict's name in spec params."""
    return _field(SECTION, MISSING, cls, cls=cls, param=param)


def meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get(_META, {})


def kind_of(f: dataclasses.Field, owner: type | None = None) -> str:
    """The kind of a settings field; a field declared without one of the helpers is a bug."""
    kind = meta(f).get("kind")
    if kind not in KINDS:
        where = f"{owner.__name__}.{f.name}" if owner is not None else f.name
        raise TypeError(f"settings field {where} has no kind: declare it with value(), policy(), runtime() or "
                        "section() (extract.settings)")
    return kind


def settings_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields of a settings dataclass, each checked to have a kind."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    out = list(fields(cls))
    for f in out:
        kind_of(f, cls)
    return out


def names_of_kind(cls: type, kind: str) -> list[str]:
    """The names of the top-level fields of `cls` of one kind (e.g. the runtime ones)."""
    return [f.name for f in settings_fields(cls) if kind_of(f, cls) == kind]


def walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, value) of every non-section field, sections entered (depth first, declared order)."""
    for f in settings_fields(obj):
        v = getattr(obj, f.name)
        if kind_of(f) == SECTION:
            yield from walk(v, path + (f.name,))
        else:
            yield path + (f.name,), f, v


def _jsonable(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def spec_params(obj: Any, input_kind: str) -> dict[str, Any]:
    """The spec params that the value fields of `obj` give a set read from `input_kind`: each field under
    its param name, inside the dict of its section (`section(param=...)`)."""
    out: dict[str, Any] = {}

    def visit(o: Any, target: dict[str, Any]) -> None:
        for f in settings_fields(o):
            m, v = meta(f), getattr(o, f.name)
            if m["kind"] == SECTION:
                sub = target.setdefault(m["param"], {}) if m.get("param") else target
                visit(v, sub)
                if m.get("param") and not sub:
                    del target[m["param"]]
            elif m["kind"] == VALUE and input_kind in m["inputs"]:
                if m.get("omit_default") and v == f.default:
                    continue
                target[m["inputs"][input_kind] or f.name] = _jsonable(v)

    visit(obj, out)
    return out


def spec_attrs(obj: Any) -> dict[str, Any]:
    """FeatureSpec attributes given by value fields (`spec="dtype"` -> {"dtype": ...})."""
    return {meta(f)["spec"]: v for _, f, v in walk(obj)
            if meta(f)["kind"] == VALUE and meta(f).get("spec") not in (None, "encoder", "compute")}


def value_dict(obj: Any) -> dict[str, Any]:
    """The value fields of `obj` (sections nested), JSON-able: what an encoder records of its options."""
    out: dict[str, Any] = {}
    for f in settings_fields(obj):
        v = getattr(obj, f.name)
        if kind_of(f) == SECTION:
            out[f.name] = value_dict(v)
        elif kind_of(f) == VALUE:
            out[f.name] = _jsonable(v)
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """Every field of a (settings) dataclass, JSON-able: what a config file would say."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if hasattr(v, "to_dict") and not isinstance(v, type):
            out[f.name] = v.to_dict()
        elif isinstance(v, Mapping):
            out[f.name] = {k: (x.to_dict() if hasattr(x, "to_dict") else _jsonable(x)) for k, x in v.items()}
        else:
            out[f.name] = _jsonable(v)
    return out


def check_field(f: dataclasses.Field, v: Any, name: str) -> list[str]:
    """The problems of one value against its field's `choices` / `min` / `max`."""
    m, out = meta(f), []
    for x in (v if isinstance(v, tuple) else (v,)):
        if m.get("choices") is not None and x not in m["choices"]:
            out.append(f"{name} = {x!r}: choose one of {', '.join(map(str, m['choices']))}")
    lo, hi = m.get("min"), m.get("max")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if lo is not None and hi is not None and not lo <= v <= hi:
            out.append(f"{name} = {v} must be within [{lo}, {hi}]")
        elif lo is not None and v < lo:
            out.append(f"{name} = {v} must be at least {lo}")
        elif hi is not None and v > hi:
            out.append(f"{name} = {v} must be at most {hi}")
    return out


def problems(obj: Any, where: str) -> list[str]:
    """Values outside a field's `choices` / `min` / `max`, sections included, plus the dataclass's own
    `extra_problems(where)` when it has one."""
    out: list[str] = []
    for f in settings_fields(obj):
        v = getattr(obj, f.name)
        if kind_of(f) == SECTION:
            out += problems(v, f"{where}.{f.name}")
        else:
            out += check_field(f, v, f"{where}.{f.name}")
    extra = getattr(obj, "extra_problems", None)
    if callable(extra):
        out += extra(where)
    return out


def _plain_type(hint: Any) -> type | None:
    """The class of a hint `X` or `X | None` when it is str, int, float or bool (else None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else None
    return hint if hint in (str, int, float, bool) else None


def _coerce(value: Any, default: Any, name: str, problems: list[str], hint: Any = None) -> tuple[bool, Any]:
    """(ok, value) with the type of `default` (int -> float, list -> tuple, a lone item -> a 1-tuple), or
    of the field's type hint when the default is None or missing (`layer: int | None`). A float must be
    finite (TOML's nan and inf are never a setting); None only stands for a default of None."""
    if value is None:
        if default is None or default is MISSING:
            return True, value
        problems.append(f"{name} = None: expected {type(default).__name__}")
        return False, value
    kind = type(default) if default is not None and default is not MISSING else _plain_type(hint)
    if kind is None:
        return True, value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            problems.append(f"{name} = {value!r}: expected a finite number")
            return False, value
        return True, float(value)
    if kind is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = []
        for i, x in enumerate(items):
            like = default[min(i, len(default) - 1)] if default else None
            ok, x = _coerce(x, like, f"{name}[{i}]", problems)
            if not ok:
                return False, value
            out.append(x)
        return True, tuple(out)
    if kind is list and isinstance(value, tuple):
        return True, list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        problems.append(f"{name} = {value!r}: expected {kind.__name__}")
        return False, value
    return True, value


def build(cls: type, data: Mapping[str, Any] | None, where: str, problems: list[str], *,
          parsers: Mapping[str, Callable[[Any, str, list[str]], Any]] | None = None) -> Any:
    """A settings dataclass from a mapping (a TOML table): sections from sub-tables, values coerced to
    the default's type; unknown keys, wrong types and missing required fields go into `problems`.
    `parsers`: field name -> function(value, where, problems) for fields with their own format."""
    data = dict(data or {})
    known = {f.name: f for f in settings_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, v in data.items():
        name = f"{where}.{key}"
        if key not in known:
            problems.append(f"{name}: unknown setting (known: {', '.join(known)})")
            continue
        f = known[key]
        if parsers and key in parsers:
            kwargs[key] = parsers[key](v, name, problems)
            continue
        if kind_of(f) == SECTION:
            if isinstance(v, meta(f)["cls"]):
                kwargs[key] = v
            elif not isinstance(v, Mapping):
                problems.append(f"{name}: expected a table of settings ([{name}])")
            else:
                kwargs[key] = build(meta(f)["cls"], v, name, problems, parsers=None)
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)  # type: ignore[misc]
        good, v = _coerce(v, default, name, problems, hints.get(key))
        if good:
            kwargs[key] = v
    required = [f.name for f in known.values() if f.default is MISSING and f.default_factory is MISSING]
    for name in required:
        if name not in data:
            problems.append(f"{where}.{name}: required")
    if any(name not in kwargs for name in required):
        for key, v in kwargs.items():   # the object cannot be made: check what was given, field by field
            if kind_of(known[key]) != SECTION:
                problems.extend(check_field(known[key], v, f"{where}.{key}"))
        return None
    return cls(**kwargs)
