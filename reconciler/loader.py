"""Spec loader: YAML text -> validated AppSpecs or located errors (path:line:col). Pure.

Parsing walks libyaml's event stream (yaml.CSafeLoader) and builds plain values while it
records a line:col for every key and value, so pydantic errors can be mapped back to the
YAML text. Walking events ourselves (instead of yaml.compose) is what lets hostile input be
refused early: libyaml's composer recurses in C (deep nesting crashes the interpreter) and
its scanner is quadratic in flow nesting depth, so the depth limit must stop the stream
before either happens. Aliases are shared, not copied, and their expanded size is budgeted
(billion laughs). Only the `read_directory`/`load_directory` helpers at the end do I/O.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import gc
import os
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reconciler.errors import SpecProblem
from reconciler.graph import DependencyGraph, format_cycle
from reconciler.spec import NAME_RE, AppSpec
from reconciler.targeting import selector_implies, untargeted_dependency_message

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
# Nodes that aliases may add to one document, and alias uses per document: generous for
# `<<: *defaults` style reuse, far below what a billion-laughs document needs.
MAX_ALIAS_NODES = 10_000
MAX_ALIASES = 200
# Per file: a spec file holds a few apps of a few hundred nodes; these bound the work a
# hostile file can cause (each document and each problem costs a validation or a string).
MAX_NODES = 50_000
MAX_DOCUMENTS = 1_000
MAX_PROBLEMS = 100
SPEC_SUFFIXES = (".yaml", ".yml")

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_IMPLICIT: dict[str, list[tuple[str, Any]]] = yaml.resolver.Resolver.yaml_implicit_resolvers
_ScalarEvent, _SequenceEndEvent = yaml.ScalarEvent, yaml.SequenceEndEvent
_MappingEndEvent = yaml.MappingEndEvent
_STR = "tag:yaml.org,2002:str"
_VALUE = "tag:yaml.org,2002:value"
_NAME_HELP = (
    "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit "
    "(names become directory names and NATS subjects, so '/', '.' and '..' are refused)"
)
Path_ = tuple[str | int, ...]
_SURPRISES = (bool, int, float, datetime.date)


@dataclass(frozen=True)
class SpecFile:
    """One spec file's bytes. `key` identifies the content (a git blob sha) so unchanged files
    are not parsed again between revisions; None means always parse."""

    path: str
    data: bytes
    key: str | None = None


@dataclass(frozen=True)
class ParsedDoc:
    """One YAML document of a file, validated on its own (no cross-file checks yet)."""

    path: str
    line: int
    col: int
    name: str | None  # the app's name when it can be read, even if the document is invalid
    name_loc: tuple[int, int]
    app: AppSpec | None
    problems: tuple[SpecProblem, ...] = ()
    dep_locs: tuple[tuple[int, int], ...] = ()  # line:col of each depends_on entry
    # line:col of a few values checked after loading (see KEPT_LOCATIONS)
    field_locs: tuple[tuple[str, int, int], ...] = ()


# Values whose location outlives parsing, for checks made later (e.g. `validate` comparing
# an archive's sha256 with the file in the repository).
KEPT_LOCATIONS = (("source", "url"), ("source", "sha256"), ("version",))


@dataclass(frozen=True)
class ParsedFile:
    path: str
    docs: tuple[ParsedDoc, ...]
    problems: tuple[SpecProblem, ...] = ()  # problems not inside one readable document


class ParseCache:
    """Per-file parse results by (path, SpecFile.key). Each load keeps only the entries it
    used, so memory follows one revision's files and unchanged files are not parsed again."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], ParsedFile] = {}
        self.hits = 0
        self.misses = 0

    def get(self, spec_file: SpecFile) -> ParsedFile | None:
        if spec_file.key is None:
            return None
        return self._entries.get((spec_file.path, spec_file.key))

    def replace(self, entries: dict[tuple[str, str], ParsedFile]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class LoadResult:
    """Every valid app of a spec tree, and every located problem.

    `invalid` names apps whose documents or cross-checks failed: the planner holds them.
    `sources` maps an app to (path, line) of its document, `locations` maps (app, index)
    to the line:col of its index-th depends_on entry, `field_locations` (app, dotted field)
    to the line:col of the values named in KEPT_LOCATIONS."""

    apps: dict[str, AppSpec]
    problems: list[SpecProblem] = field(default_factory=list)
    invalid: frozenset[str] = frozenset()
    sources: dict[str, tuple[str, int]] = field(default_factory=dict)
    locations: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    files: int = 0
    # (app, "source.sha256") -> line:col, for the fields in KEPT_LOCATIONS
    field_locations: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def valid_apps(self) -> dict[str, AppSpec]:
        return {n: a for n, a in self.apps.items() if n not in self.invalid}


# ---------------------------------------------------------------------------------------
# Parsing one file


class _Refused(Exception):
    """Stops reading a file: the rest of it is not looked at (too deep, alias bomb)."""

    def __init__(self, line: int, col: int, message: str) -> None:
        super().__init__(message)
        self.line, self.col, self.message = line, col, message


# path -> (key line, key col, value line, value col, raw text of a plain scalar that YAML
# turned into something other than a string, else None)
_Loc = tuple[Any, Any, str | None]  # (key mark, value mark, raw); marks are 0-based


def _at(mark: Any) -> tuple[int, int]:
    """A libyaml mark as a 1-based (line, col)."""
    return mark.line + 1, mark.column + 1


class _Composer:
    """Builds the values of one file's documents from libyaml events, recording marks."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.parser = _Loader(text)
        self.locs: dict[Path_, _Loc] = {}
        self.loc_list: list[tuple[Path_, _Loc]] = []
        self.anchors: dict[str, tuple[Any, Path_, int, int, int]] = {}
        self.open_anchors: set[str] = set()
        self.nodes = 0
        self.budget = MAX_NODES
        self.alias_nodes = 0
        self.aliases = 0
        self.problems: list[SpecProblem] = []

    def close(self) -> None:
        self.parser.dispose()

    def documents(self) -> Iterator[tuple[Any, int, int]]:
        """(root value, line, col) per non-empty document; resets marks for each."""
        parser = self.parser
        parser.get_event()  # StreamStart
        documents = used = 0
        while not parser.check_event(yaml.StreamEndEvent):
            start = parser.get_event()  # DocumentStart
            documents += 1
            if documents > MAX_DOCUMENTS:
                mark = start.start_mark
                raise _Refused(mark.line + 1, mark.column + 1,
                               f"more than {MAX_DOCUMENTS} documents in one file; refused")
            used += self.nodes
            self.budget = MAX_NODES - used
            self.locs, self.loc_list, self.anchors = {}, [], {}
            self.nodes = self.alias_nodes = self.aliases = 0
            self.problems = []
            event = parser.get_event()
            mark = event.start_mark
            value = self._node(event, (), 0)
            parser.get_event()  # DocumentEnd
            self.locs[()] = (mark, mark, None)
            yield value, mark.line + 1, mark.column + 1

    def _record(self, path: Path_, loc: _Loc) -> None:
        self.locs[path] = loc
        if self.anchors or self.open_anchors:
            self.loc_list.append((path, loc))

    def _problem(self, mark: Any, message: str) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            raise _Refused(mark.line + 1, mark.column + 1,
                           f"{len(self.problems)} problems so far; stopped reading this file")
        self.problems.append(SpecProblem(self.path, mark.line + 1, mark.column + 1, message))

    def _scalar(self, event: Any) -> Any:
        tag = event.tag
        value = event.value
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return value
            # Resolver.resolve inlined: it is the loader's hottest Python function.
            tag = _STR
            for candidate, regexp in _IMPLICIT.get(value[:1], ()):
                if regexp.match(value):
                    tag = candidate
                    break
        if tag in (_STR, _VALUE):  # a lone plain `=` is text, not a "value" node
            return value
        construct = self.parser.yaml_constructors.get(tag)
        if construct is None or tag.endswith((":seq", ":map", ":omap", ":pairs", ":set")):
            self._problem(event.start_mark, f"unsupported YAML tag {tag!r}")
            return value
        node = yaml.ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
        try:
            return construct(self.parser, node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            self._problem(event.start_mark, f"cannot read {value!r} as {tag}: {exc}")
            return value

    def _node(self, event: Any, path: Path_, depth: int) -> Any:
        kind = type(event)
        self.nodes += 1
        if kind is yaml.ScalarEvent:
            scalar = self._scalar(event)
            if event.anchor:
                self.anchors[event.anchor] = (scalar, path, 1, 0, 0)
            return scalar
        if kind is yaml.AliasEvent:
            return self._alias(event, path)
        if depth >= MAX_DEPTH:
            mark = event.start_mark
            raise _Refused(
                mark.line + 1, mark.column + 1, f"nested deeper than {MAX_DEPTH} levels; refused"
            )
        anchor = event.anchor
        start_nodes, start_locs = self.nodes, len(self.loc_list)
        if anchor:
            self.open_anchors.add(anchor)
        if kind is yaml.SequenceStartEvent:
            if event.tag not in (None, "!", "tag:yaml.org,2002:seq"):
                self._problem(event.start_mark, f"unsupported YAML tag {event.tag!r}")
            value: Any = self._sequence(path, depth)
        elif kind is yaml.MappingStartEvent:
            if event.tag not in (None, "!", "tag:yaml.org,2002:map"):
                self._problem(event.start_mark, f"unsupported YAML tag {event.tag!r}")
            value = self._mapping(path, depth)
        else:  # pragma: no cover - libyaml never yields another event here
            raise _Refused(event.start_mark.line + 1, 1, "unexpected YAML event")
        if anchor:
            self.open_anchors.discard(anchor)
            self.anchors[anchor] = (
                value, path, self.nodes - start_nodes + 1, start_locs, len(self.loc_list)
            )
        return value

    def _alias(self, event: Any, path: Path_) -> Any:
        mark = event.start_mark
        name = event.anchor
        if name in self.open_anchors:
            raise _Refused(mark.line + 1, mark.column + 1, f"recursive alias *{name}; refused")
        target = self.anchors.get(name)
        if target is None:
            self._problem(mark, f"alias *{name} names no anchor (&{name}) before it")
            return None
        value, origin, size, first, last = target
        self.aliases += 1
        self.alias_nodes += size
        # Counted as expanded, so an anchor made of aliases has its full expanded size.
        self.nodes += size - 1
        if self.aliases > MAX_ALIASES or self.alias_nodes > MAX_ALIAS_NODES:
            raise _Refused(
                mark.line + 1,
                mark.column + 1,
                f"aliases expand to more than {MAX_ALIAS_NODES} nodes or are used more than "
                f"{MAX_ALIASES} times; refused (this is how 'billion laughs' bombs work)",
            )
        # Marks inside the aliased value point at the anchor's text.
        cut = len(origin)
        for sub, loc in self.loc_list[first:last]:
            self._record(path + sub[cut:], loc)
        return value

    def _too_many(self, event: Any) -> None:
        mark = event.start_mark
        raise _Refused(mark.line + 1, mark.column + 1,
                       f"more than {MAX_NODES} YAML nodes in one file; refused")

    def _value(self, event: Any, path: Path_, depth: int) -> tuple[Any, str | None]:
        """A node's value, and the raw text when a plain scalar became a non-string."""
        if type(event) is _ScalarEvent and not event.anchor:
            self.nodes += 1
            value = self._scalar(event)
            if type(value) is str or event.style or not isinstance(value, _SURPRISES):
                return value, None
            return value, str(event.value)
        return self._node(event, path, depth), None

    def _sequence(self, path: Path_, depth: int) -> list[Any]:
        items: list[Any] = []
        get_event = self.parser.get_event
        locs = self.locs
        while True:
            event = get_event()
            if type(event) is _SequenceEndEvent:
                return items
            if self.nodes > self.budget:
                self._too_many(event)
            sub = (*path, len(items))
            value, raw = self._value(event, sub, depth + 1)
            mark = event.start_mark
            locs[sub] = loc = (mark, mark, raw)
            if self.anchors or self.open_anchors:
                self.loc_list.append((sub, loc))
            items.append(value)

    def _mapping(self, path: Path_, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges: list[Any] = []
        get_event = self.parser.get_event
        locs = self.locs
        while True:
            key_event = get_event()
            if type(key_event) is _MappingEndEvent:
                break
            key_mark = key_event.start_mark
            if self.nodes > self.budget:
                self._too_many(key_event)
            if type(key_event) is not _ScalarEvent:
                self._node(key_event, path, depth + 1)
                self._problem(key_mark, "mapping keys must be plain text, not lists or mappings")
                self._node(get_event(), path, depth + 1)
                continue
            key = key_event.value
            value_event = get_event()
            if key == "<<" and not key_event.style and key_event.tag is None:
                merges.append((key_mark, self._node(value_event, path, depth + 1)))
                continue
            sub = (*path, key)
            value, raw = self._value(value_event, sub, depth + 1)
            if key in result:
                first = locs.get(sub)
                where = f" (first at line {first[0].line + 1})" if first else ""
                self._problem(key_mark, f"duplicate key {key!r}{where}")
                continue
            locs[sub] = loc = (key_mark, value_event.start_mark, raw)
            if self.anchors or self.open_anchors:
                self.loc_list.append((sub, loc))
            result[key] = value
        for mark, merged in merges:
            sources = enumerate(merged) if isinstance(merged, list) else [(None, merged)]
            for index, source in sources:
                if not isinstance(source, dict):
                    self._problem(mark, "'<<' merges a mapping or a list of mappings")
                    continue
                for key, value in source.items():
                    if key in result:
                        continue
                    result[key] = value
                    if index is not None and (found := locs.get((*path, index, key))):
                        locs[(*path, key)] = found
        return result


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a date"


def _line_col(text: str | bytes, offset: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    col = offset - (text.rfind(newline, 0, offset) + 1) + 1  # type: ignore[arg-type]
    return line, col


def _yaml_error(path: str, text: str, exc: yaml.YAMLError) -> SpecProblem:
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        message = exc.problem or "invalid YAML"
        if exc.context:
            message = f"{message} ({exc.context})"
        return SpecProblem(path, mark.line + 1, mark.column + 1, f"YAML syntax error: {message}")
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _line_col(text, exc.position)
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        return SpecProblem(
            path, line, col, f"character {char!r} is not allowed in YAML ({exc.reason})"
        )
    return SpecProblem(path, 1, 1, f"YAML error: {exc}")


def parse_file(spec_file: SpecFile, max_bytes: int = MAX_FILE_BYTES) -> ParsedFile:
    """Read and validate every document of one file on its own. Never raises."""
    path, data = spec_file.path, spec_file.data
    if len(data) > max_bytes:
        return ParsedFile(
            path, (), (SpecProblem(path, 1, 1, f"file is larger than {max_bytes} bytes; refused"),)
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col(data, exc.start)
        bad = data[exc.start : exc.start + 1].hex()
        return ParsedFile(
            path, (), (SpecProblem(path, line, col, f"not valid UTF-8 (byte 0x{bad})"),)
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    docs: list[ParsedDoc] = []
    file_problems: list[SpecProblem] = []
    composer: _Composer | None = None
    try:
        # Inside the try: the pure-Python fallback parser checks characters on construction.
        composer = _Composer(path, text)
        count = 0
        for value, line, col in composer.documents():
            doc = _validate_document(composer, value, line, col)
            if doc is not None:
                docs.append(doc)
                count += len(doc.problems)
            if count >= MAX_PROBLEMS:
                file_problems.append(SpecProblem(
                    path, line, col, f"{count} problems so far; stopped reading this file"))
                break
    except _Refused as exc:
        file_problems.extend(composer.problems if composer else ())
        file_problems.append(SpecProblem(path, exc.line, exc.col, exc.message))
    except yaml.YAMLError as exc:
        file_problems.extend(composer.problems if composer else ())
        file_problems.append(_yaml_error(path, text, exc))
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps us far from the limit
        file_problems.append(SpecProblem(path, 1, 1, "nested too deeply; refused"))
    finally:
        if composer is not None:
            composer.close()
    return ParsedFile(path, tuple(docs), tuple(file_problems))


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _validate_document(composer: _Composer, value: Any, line: int, col: int) -> ParsedDoc | None:
    path, locs = composer.path, composer.locs
    problems = list(composer.problems)
    if value is None and not problems:
        return None  # an empty document (`---` with nothing under it)
    if not isinstance(value, dict):
        problems.append(
            SpecProblem(
                path, line, col,
                f"a document must be a mapping of fields (name: ..., version: ...), "
                f"not {_type_name(value)}",
            )
        )
        return ParsedDoc(path, line, col, None, (line, col), None, tuple(problems))
    name = value.get("name")
    name_loc = locs.get(("name",))
    name_at = _at(name_loc[1]) if name_loc else (line, col)
    readable_name = name if isinstance(name, str) and NAME_RE.match(name) else None
    version_loc = locs.get(("version",))
    if version_loc and version_loc[2] is not None:
        raw = version_loc[2]
        kind = _kind(value["version"])
        problems.append(
            SpecProblem(
                path, *_at(version_loc[1]),
                f"{raw} was read as {kind}; quote it (version: \"{raw}\") so YAML keeps it "
                "as written",
                field="version",
            )
        )
        value = {**value, "version": raw}
    deps = value.get("depends_on")
    dep_locs: tuple[tuple[int, int], ...] = ()
    if isinstance(deps, list):
        dep_locs = tuple(
            _at(loc[1]) if (loc := locs.get(("depends_on", i))) else name_at
            for i in range(len(deps))
        )
    app: AppSpec | None = None
    try:
        app = AppSpec.model_validate(value)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(path, locs, exc))
    except (ValueError, TypeError) as exc:  # pragma: no cover - defensive: always located
        problems.append(SpecProblem(path, line, col, str(exc)))
    if problems:
        app = None
    elif app is not None:
        readable_name = app.name  # e.g. a !!binary name pydantic turned into text
    return ParsedDoc(
        path, line, col, readable_name, name_at, app, tuple(sorted(set(problems))), dep_locs,
        tuple(
            (".".join(key), *_at(loc[1])) for key in KEPT_LOCATIONS if (loc := locs.get(key))
        ),
    )


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _model_classes(arg)]


def _field_places(
    model: type[BaseModel], prefix: str = "", places: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Every field name of the spec format -> the dotted places it may appear."""
    places = {} if places is None else places
    for fname, info in model.model_fields.items():
        key = info.alias or fname
        dotted = prefix + key
        if dotted not in places.setdefault(key, []):
            places[key].append(dotted)
        for sub in _model_classes(info.annotation):
            _field_places(sub, dotted + ".", places)
    return places


_FIELD_PLACES = _field_places(AppSpec)
_FIELD_NAMES = sorted(_FIELD_PLACES)


def _unknown_field(name: str, current: Path_) -> str:
    here = ".".join(str(p) for p in current[:-1] if isinstance(p, str))
    places = [p for p in _FIELD_PLACES.get(name, []) if p.rpartition(".")[0] != here]
    if places:
        return f"unknown field {name!r} here; it belongs at {' or '.join(sorted(places))}"
    names = [n for n in _FIELD_NAMES if n != name]
    hint = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return f"unknown field {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _format_field(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_problems(
    path: str, locs: dict[Path_, _Loc], exc: ValidationError
) -> list[SpecProblem]:
    """Each pydantic error at the closest YAML node its location names (union tags and
    validator names in the location are skipped; a missing field is reported at its parent)."""
    problems: list[SpecProblem] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        etype = error["type"]
        current: Path_ = ()
        missing: str | None = None
        on_key = etype == "extra_forbidden"
        for part in loc:
            candidate = (*current, part)
            if candidate in locs:
                current = candidate
            elif part == "[key]":
                on_key = True
            elif etype == "missing" and part == loc[-1] and isinstance(part, str):
                missing = part
        entry = locs.get(current) or locs[()]
        at = _at(entry[0] if on_key else entry[1])
        shown = _format_field(current + ((missing,) if missing else ()))
        message = _message(error, current, entry, missing)
        problems.append(SpecProblem(path, at[0], at[1], message, field=shown))
    return problems


def _message(error: Any, current: Path_, entry: _Loc, missing: str | None) -> str:
    etype, msg = error["type"], str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    last = current[-1] if current else None
    raw = entry[2]
    if etype == "missing":
        return f"required field {missing!r} is missing" if missing else "required field missing"
    if etype == "extra_forbidden":
        return _unknown_field(str(error["loc"][-1]), current)
    if etype == "string_pattern_mismatch" and (
        last == "name" or (len(current) == 2 and current[0] == "depends_on")
    ):
        return f"invalid app name {error['input']!r}: {_NAME_HELP}"
    if etype == "string_type" and raw is not None:
        kind = _kind(error["input"])
        return f"{raw} was read as {kind}; quote it (\"{raw}\") if you mean text"
    return msg


# ---------------------------------------------------------------------------------------
# Loading a tree


def load_files(
    files: Iterable[SpecFile],
    cache: ParseCache | None = None,
    *,
    apps_path: str = "apps",
    max_bytes: int = MAX_FILE_BYTES,
) -> LoadResult:
    """Parse (or reuse from `cache`) every file, then check the tree as a whole: duplicate
    names, unknown dependencies, cycles, and dependencies not targeted where they are needed.

    An empty file list is a problem too (a missing or mistyped apps folder must not read as
    "remove everything"); a tree with no apps is one YAML file with no documents in it."""
    parsed: list[ParsedFile] = []
    used: dict[tuple[str, str], ParsedFile] = {}
    with _gc_paused():
        for spec_file in sorted(files, key=lambda f: f.path):
            result = cache.get(spec_file) if cache is not None else None
            if result is None:
                result = parse_file(spec_file, max_bytes)
                if cache is not None:
                    cache.misses += 1
            elif cache is not None:
                cache.hits += 1
            if spec_file.key is not None:
                used[(spec_file.path, spec_file.key)] = result
            parsed.append(result)
        if cache is not None:
            cache.replace(used)
        return check_tree(parsed, apps_path=apps_path)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates many small tuples and dicts that all stay alive, which makes the
    cyclic GC run full collections over the whole heap for nothing; like json and pickle
    loaders, pause it while loading. (Re-enabled after, so at worst a collection is late.)"""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_tree(parsed: list[ParsedFile], apps_path: str = "apps") -> LoadResult:
    """The cross-file checks over already parsed files."""
    problems: list[SpecProblem] = []
    if not parsed:
        problems.append(
            SpecProblem(
                apps_path, 1, 1,
                "no *.yaml or *.yml spec files found; nothing is removed while the spec tree "
                "is empty (to remove every app, keep one YAML file with no documents)",
            )
        )
    by_name: dict[str, list[ParsedDoc]] = {}
    for pfile in parsed:
        problems.extend(pfile.problems)
        for doc in pfile.docs:
            problems.extend(doc.problems)
            if doc.name is not None:
                by_name.setdefault(doc.name, []).append(doc)
    invalid: set[str] = set()
    apps: dict[str, AppSpec] = {}
    sources: dict[str, tuple[str, int]] = {}
    docs: dict[str, ParsedDoc] = {}
    for name, named in by_name.items():
        first = named[0]
        sources[name] = (first.path, first.line)
        docs[name] = first
        if len(named) > 1:
            invalid.add(name)
            for doc in named:
                others = ", ".join(
                    f"{o.path}:{o.name_loc[0]}:{o.name_loc[1]}" for o in named if o is not doc
                )
                problems.append(
                    SpecProblem(
                        doc.path, doc.name_loc[0], doc.name_loc[1],
                        f"duplicate app name {name!r} (also at {others})", field="name",
                    )
                )
        elif first.app is None:
            invalid.add(name)
        else:
            apps[name] = first.app
    locations: dict[tuple[str, int], tuple[int, int]] = {}
    known = set(by_name)
    for name, app in apps.items():
        doc = docs[name]
        for index, dep in enumerate(app.depends_on):
            where = doc.dep_locs[index] if index < len(doc.dep_locs) else doc.name_loc
            locations[(name, index)] = where
            if dep in known:
                continue
            invalid.add(name)
            hint = difflib.get_close_matches(dep, sorted(known), n=1)
            problems.append(
                SpecProblem(
                    doc.path, where[0], where[1],
                    f"depends on {dep!r}, which no app defines"
                    + (f"; did you mean {hint[0]!r}?" if hint else ""),
                    field=f"depends_on[{index}]",
                )
            )
    valid = {n: a for n, a in apps.items() if n not in invalid}
    for cycle in DependencyGraph.from_apps(valid).find_cycles():
        invalid.update(cycle)
        head = cycle[0]
        index = apps[head].depends_on.index(cycle[1] if len(cycle) > 1 else head)
        where = locations[(head, index)]
        problems.append(
            SpecProblem(
                docs[head].path, where[0], where[1],
                f"dependency cycle: {format_cycle(cycle)}", field=f"depends_on[{index}]",
            )
        )
    for name, app in apps.items():
        if name in invalid:
            continue
        for index, dep in enumerate(app.depends_on):
            dep_app = apps.get(dep)
            if dep_app is None or selector_implies(app.nodes, dep_app.nodes):
                continue
            invalid.add(name)
            where = locations[(name, index)]
            problems.append(
                SpecProblem(
                    docs[name].path, where[0], where[1],
                    untargeted_dependency_message(app, dep_app), field=f"depends_on[{index}]",
                )
            )
    return LoadResult(
        apps=dict(sorted(apps.items())),
        problems=sorted(set(problems)),
        invalid=frozenset(invalid),
        sources=sources,
        locations=locations,
        files=len(parsed),
        field_locations={
            (name, key): (line, col)
            for name, doc in docs.items()
            for key, line, col in doc.field_locs
        },
    )


# ---------------------------------------------------------------------------------------
# Reading a directory (the only I/O here; the git tree is read by reconciler.source)


def read_directory(
    root: Path, apps_path: str = "apps", max_bytes: int = MAX_FILE_BYTES
) -> list[SpecFile]:
    """Every *.yaml/*.yml below root/apps_path (root itself when apps_path is ""), paths
    relative to root with '/' separators. Hidden folders and symlinked folders are skipped;
    files are read up to max_bytes + 1 so a huge file is refused without reading it all."""
    base = root / apps_path if apps_path else root
    if base.is_file():
        return [_read_one(base, base.name, max_bytes)]
    files: list[SpecFile] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.endswith(SPEC_SUFFIXES) and not filename.startswith("."):
                full = Path(dirpath) / filename
                files.append(_read_one(full, full.relative_to(root).as_posix(), max_bytes))
    return files


def _read_one(full: Path, rel: str, max_bytes: int) -> SpecFile:
    with open(full, "rb") as handle:
        return SpecFile(path=rel, data=handle.read(max_bytes + 1))


def resolve_spec_path(path: Path, apps_path: str | None = None) -> tuple[Path, str]:
    """`validate PATH` accepts a repo root (its apps/ is used), an apps folder or one file:
    -> (root that paths are shown relative to, apps path inside it)."""
    if apps_path is not None:
        return path, apps_path
    if path.is_file():
        return path.parent, path.name
    if (path / "apps").is_dir():
        return path, "apps"
    return path, ""


def load_directory(root: Path, apps_path: str = "apps") -> LoadResult:
    return load_files(read_directory(root, apps_path), apps_path=apps_path or str(root))
