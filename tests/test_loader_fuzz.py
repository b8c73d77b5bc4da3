"""Fuzzing the loader: whatever the bytes, it yields apps or located errors, never raises."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.loader import LoadResult, SpecFile, load_files

EXAMPLE = Path(__file__).resolve().parent.parent / "specs-example" / "apps"
SEEDS = [p.read_bytes() for p in sorted(EXAMPLE.glob("*.yaml"))]
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(data: bytes) -> LoadResult:
    result = load_files([SpecFile("apps/fuzz.yaml", data)])
    for problem in result.problems:
        assert problem.path == "apps/fuzz.yaml"
        assert problem.line >= 1 and problem.col >= 1
        assert problem.message
        assert str(problem).startswith(f"apps/fuzz.yaml:{problem.line}:{problem.col}: ")
    for name, app in result.apps.items():
        assert app.name == name
    assert result.invalid <= set(result.sources)
    return result


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}&*!|>'\"#%@`,?\n\t  0123.~<")),
               max_size=400))
def test_yaml_punctuation_soup(text: str) -> None:
    check(text.encode())


_MUTATION = st.tuples(
    st.sampled_from(["delete", "insert", "duplicate-line", "swap-lines", "replace"]),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=40),
    st.binary(min_size=0, max_size=12) | st.sampled_from(
        [b"\t", b": ", b"- ", b"*a", b"&a ", b"\xff", b"---\n", b"1.10", b"  ", b"\n", b"{", b"]"]
    ),
)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_valid_specs(seed: bytes, mutations: list[tuple[str, int, int, bytes]]) -> None:
    data = seed
    for kind, position, length, chunk in mutations:
        at = position % (len(data) + 1)
        if kind == "delete":
            data = data[:at] + data[at + length:]
        elif kind == "insert":
            data = data[:at] + chunk + data[at:]
        elif kind == "replace":
            data = data[:at] + chunk + data[at + len(chunk):]
        else:
            lines = data.split(b"\n")
            i, j = at % len(lines), (at + length) % len(lines)
            if kind == "duplicate-line":
                lines.insert(i, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = b"\n".join(lines)
    check(data)


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=20)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(
        ["name", "version", "depends_on", "nodes", "match", "run", "command", "env", "health",
         "http", "url", "tcp", "port", "source", "type", "sha256", "restart", "suspend", "x"]
    ), inner, max_size=5),
    max_leaves=12,
)


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(st.sampled_from(["name", "version", "depends_on", "nodes", "run",
                                        "health", "source", "labels", "suspend"]),
                       _VALUES, max_size=8))
def test_structured_documents_with_spec_shaped_keys(doc: dict[str, object]) -> None:
    result = check(yaml.safe_dump(doc).encode())
    if not result.ok:
        return
    # when it loads, it is the document it was given
    if result.apps:
        (app,) = result.apps.values()
        assert app.name == doc["name"]
        assert app.version == doc["version"]
