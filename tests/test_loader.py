"""Loader: valid trees load, every error kind is reported at its exact path:line:col."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from reconciler.core.loader import MAX_FILE_BYTES, ParseCache, SpecFile, load_files
from reconciler.core.spec import AppSpec, Selector
from reconciler.core.state import desired_for_node
from reconciler.core.targeting import parse_labels, selector_implies
from reconciler.node.spec_dir import load_directory, read_directory, resolve_spec_path
from tests.conftest import make_spec_repo


def load(files: dict[str, str | bytes]):  # type: ignore[no-untyped-def]
    return load_files(
        [SpecFile(p, d.encode() if isinstance(d, str) else d) for p, d in files.items()]
    )


def problems(files: dict[str, str | bytes]) -> list[str]:
    return [str(p) for p in load(files).problems]


APP = 'name: {name}\nversion: "1.0"\n'


def test_valid_tree_loads_every_app_with_its_source() -> None:
    result = load(
        {
            "apps/a.yaml": "# platform\nname: db\nversion: '2.1'\n---\n\n---\nname: api\n"
            'version: "1.0"\ndepends_on: [db]\nrun:\n  command: [python3, app.py]\n'
            "  env: {MODE: prod}\n",
            "apps/sub/b.yml": APP.format(name="web") + "depends_on: [api]\n",
            "apps/empty.yaml": "# nothing here yet\n",
        }
    )
    assert result.ok
    assert result.problems == []
    assert result.invalid == frozenset()
    assert sorted(result.apps) == ["api", "db", "web"]
    assert result.apps["api"] == AppSpec.model_validate(
        {
            "name": "api",
            "version": "1.0",
            "depends_on": ["db"],
            "run": {"command": ["python3", "app.py"], "env": {"MODE": "prod"}},
        }
    )
    assert result.sources == {
        "db": ("apps/a.yaml", 2),
        "api": ("apps/a.yaml", 7),
        "web": ("apps/sub/b.yml", 1),
    }
    assert result.files == 3


# (files, exact problems). One row per error kind the issue lists.
LOCATED = [
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nrun:\n  command: [a]\n  bogus: 1\n'},
        ["apps/a.yaml:5:3: run.bogus: unknown field 'bogus'"],
        id="unknown-field",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\ndepnds_on: [x]\n'},
        ["apps/a.yaml:3:1: depnds_on: unknown field 'depnds_on'; did you mean 'depends_on'?"],
        id="unknown-field-did-you-mean",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nenv: {A: b}\n'},
        ["apps/a.yaml:3:1: env: unknown field 'env' here; it belongs at run.env"],
        id="field-in-the-wrong-place",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nhealth:\n  url: http://x/\n'},
        ["apps/a.yaml:4:3: health.url: unknown field 'url' here; it belongs at "
         "health.http.url or source.url"],
        id="field-in-the-wrong-place-nested",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nrun: {command: [a]}\n"},
        ["apps/a.yaml:1:1: version: required field 'version' is missing"],
        id="missing-field",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nsource:\n  type: archive\n  url: x.tgz\n'},
        ["apps/a.yaml:4:3: source.sha256: required field 'sha256' is missing"],
        id="missing-nested-field-in-union",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nhealth:\n  http: {url: "http://x/"}\n'
                        "  interval: soon\n"},
        ["apps/a.yaml:5:13: health.interval: invalid duration 'soon': use e.g. '500ms', "
         "'5s', '2m', '1h'"],
        id="bad-duration",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nrun:\n  command:\n    - a\n    - 7\n'},
        ["apps/a.yaml:6:7: run.command[1]: 7 was read as a number; quote it (\"7\") if you "
         "mean text"],
        id="list-item-number",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nlabels:\n  debug: yes\n'},
        ["apps/a.yaml:4:10: labels.debug: yes was read as a boolean; quote it (\"yes\") if "
         "you mean text"],
        id="label-boolean",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: 1.10\n"},
        ['apps/a.yaml:2:10: version: 1.10 was read as a number; quote it (version: "1.10") '
         "so YAML keeps it as written"],
        id="unquoted-version-keeps-raw-text",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: 2\n"},
        ['apps/a.yaml:2:10: version: 2 was read as a number; quote it (version: "2") so YAML '
         "keeps it as written"],
        id="unquoted-int-version",
    ),
    pytest.param(
        {"apps/a.yaml": 'name: api\nversion: "1"\nversion: "2"\n'},
        ["apps/a.yaml:3:1: duplicate key 'version' (first at line 2)"],
        id="duplicate-key",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="api"), "apps/b.yaml": "# b\n" + APP.format(name="api")},
        [
            "apps/a.yaml:1:7: name: duplicate app name 'api' (also at apps/b.yaml:2:7)",
            "apps/b.yaml:2:7: name: duplicate app name 'api' (also at apps/a.yaml:1:7)",
        ],
        id="duplicate-app-name",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="api") + "depends_on: [db, cache]\n",
         "apps/b.yaml": APP.format(name="db")},
        ["apps/a.yaml:3:18: depends_on[1]: depends on 'cache', which no app defines"],
        id="unknown-dependency",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="api") + "depends_on:\n  - dbb\n",
         "apps/b.yaml": APP.format(name="db")},
        ["apps/a.yaml:4:5: depends_on[0]: depends on 'dbb', which no app defines; "
         "did you mean 'db'?"],
        id="unknown-dependency-did-you-mean",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="a") + "depends_on: [b]\n---\n"
                        + APP.format(name="b") + "depends_on: [c]\n---\n"
                        + APP.format(name="c") + "depends_on: [a]\n"},
        ["apps/a.yaml:3:14: depends_on[0]: dependency cycle: a -> b -> c -> a"],
        id="cycle",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="a") + "depends_on: [a]\n"},
        ["apps/a.yaml:1:1: app 'a' depends on itself"],
        id="self-dependency",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="api") + "depends_on: [db]\n",
         "apps/b.yaml": APP.format(name="db") + "nodes: {match: {role: db}}\n"},
        ["apps/a.yaml:3:14: depends_on[0]: 'api' runs on every node but its dependency 'db' "
         "only on nodes with role=db; target 'db' at least wherever 'api' runs"],
        id="dependency-not-targeted-where-dependent-is",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="api") + "depends_on: [db]\n"
                        "nodes: {match: {role: edge}}\n",
         "apps/b.yaml": APP.format(name="db") + "nodes: {in: {role: [edge, core]}}\n"},
        [],
        id="dependency-selector-implied",
    ),
    pytest.param(
        {"apps/a.yaml": "name: ../x\nversion: '1'\n"},
        ["apps/a.yaml:1:7: name: invalid app name '../x': use 1-63 lowercase letters, digits "
         "and '-', starting and ending with a letter or digit (names become directory names "
         "and NATS subjects, so '/', '.' and '..' are refused)"],
        id="name-escaping-directory",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\ndepends_on: [/etc]\n"},
        ["apps/a.yaml:3:14: depends_on[0]: invalid app name '/etc': use 1-63 lowercase "
         "letters, digits and '-', starting and ending with a letter or digit (names become "
         "directory names and NATS subjects, so '/', '.' and '..' are refused)"],
        id="dependency-name-absolute-path",
    ),
    pytest.param(
        {"apps/a.yaml": "- name: api\n  version: '1'\n"},
        ["apps/a.yaml:1:1: a document must be a mapping of fields (name: ..., version: ...), "
         "not a list"],
        id="non-mapping-document",
    ),
    pytest.param(
        {"apps/a.yaml": APP.format(name="ok") + "---\njust text\n"},
        ["apps/a.yaml:4:1: a document must be a mapping of fields (name: ..., version: ...), "
         "not a string"],
        id="scalar-document-after-a-good-one",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\nrun: {command: [a, b}\n"},
        ["apps/a.yaml:3:21: YAML syntax error: did not find expected ',' or ']' "
         "(while parsing a flow sequence)"],
        id="yaml-syntax-error",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\n\tversion: '1'\n"},
        ["apps/a.yaml:2:1: YAML syntax error: found a tab character that violates indentation "
         "(while scanning a plain scalar)"],
        id="tab-indentation",
    ),
    pytest.param(
        {"apps/a.yaml": b"name: api\nversion: '1'\ndescription: caf\xe9\n"},
        ["apps/a.yaml:3:17: not valid UTF-8 (byte 0xe9)"],
        id="non-utf8",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\ndescription: a\x07b\n"},
        ["apps/a.yaml:3:15: character '\\x07' is not allowed in YAML (control characters are "
         "not allowed)"],
        id="control-character",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\nlabels: !!python/object:os.system {}\n"},
        ["apps/a.yaml:3:9: unsupported YAML tag 'tag:yaml.org,2002:python/object:os.system'"],
        id="python-tag-refused",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\n[a]: 1\n"},
        ["apps/a.yaml:3:1: mapping keys must be plain text, not lists or mappings"],
        id="complex-key",
    ),
    pytest.param(
        {"apps/a.yaml": "name: api\nversion: '1'\nlabels: *nowhere\n"},
        ["apps/a.yaml:3:9: labels: Input should be a valid dictionary",
         "apps/a.yaml:3:9: alias *nowhere names no anchor (&nowhere) before it"],
        id="undefined-alias",
    ),
]


@pytest.mark.parametrize(("files", "expected"), LOCATED)
def test_located_problems(files: dict[str, str | bytes], expected: list[str]) -> None:
    assert problems(files) == expected


def test_invalid_documents_and_cross_checks_make_their_apps_invalid() -> None:
    result = load(
        {
            "apps/a.yaml": APP.format(name="good") + "---\nname: bad\nversion: 3\n",
            "apps/b.yaml": APP.format(name="lost") + "depends_on: [nothing]\n",
            "apps/c.yaml": APP.format(name="x") + "depends_on: [y]\n---\n"
            + APP.format(name="y") + "depends_on: [x]\n",
            "apps/d.yaml": APP.format(name="uses-x") + "depends_on: [x]\n",
        }
    )
    assert result.invalid == frozenset({"bad", "lost", "x", "y"})
    assert sorted(result.valid_apps) == ["good", "uses-x"]
    assert "bad" not in result.apps  # its document never validated


# ---- hostile input: refused with a located error, quickly, never a crash or a hang ----

HOSTILE = [
    pytest.param(
        b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 10)}]\n".encode()
            for c in "bcdefghi"
        ),
        "apps/bomb.yaml:4:36: aliases expand to more than 10000 nodes or are used more than "
        "200 times; refused (this is how 'billion laughs' bombs work)",
        id="billion-laughs",
    ),
    pytest.param(
        b"a: &a [1, *a]\n",
        "apps/bomb.yaml:1:11: recursive alias *a; refused",
        id="recursive-alias",
    ),
    pytest.param(
        b"x: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        # PyYAML >= 6.0.4 refuses this itself before our limit sees it; either way it must
        # be a located refusal of this file only
        "apps/bomb.yaml:1:*nest*",
        id="deep-flow-nesting",
    ),
    pytest.param(
        b"x:\n" + b"- " * 200_000 + b"leaf\n",
        "apps/bomb.yaml:2:63: nested deeper than 32 levels; refused",
        id="deep-block-nesting",
    ),
    pytest.param(
        b"description: '" + b"x" * (MAX_FILE_BYTES + 10) + b"'\n",
        f"apps/bomb.yaml:1:1: file is larger than {MAX_FILE_BYTES} bytes; refused",
        id="over-size-limit",
    ),
]


# A guard against a hang, not a speed check: these inputs take libyaml's own composer
# minutes (or crash the interpreter) without the event-level limits.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("data", "expected"), HOSTILE)
def test_hostile_input_is_refused_with_a_located_error(data: bytes, expected: str) -> None:
    result = load({"apps/bomb.yaml": data, "apps/ok.yaml": APP.format(name="ok")})
    # What users rely on is a refusal located in the bad file, not one library's wording:
    # a pattern ("path:line:*word*") checks the place and a keyword, case-insensitively.
    [problem] = result.problems
    if "*" in expected:
        assert fnmatch.fnmatch(str(problem).lower(), expected.lower() + "*"), str(problem)
        assert problem.col > 0
    else:
        assert str(problem) == expected
    assert sorted(result.apps) == ["ok"]


def test_merge_keys_and_small_aliases_are_fine_and_located_at_the_anchor() -> None:
    text = (
        "name: api\nversion: '1'\n"
        "health: &probe\n  tcp: {port: 80}\n  interval: 2s\n"
        "run:\n  <<: &defaults\n    command: [a]\n    stop_timeout: never\n  env: {A: b}\n"
    )
    assert problems({"apps/a.yaml": text}) == [
        "apps/a.yaml:9:19: run.stop_timeout: invalid duration 'never': use e.g. '500ms', "
        "'5s', '2m', '1h'"
    ]
    fixed = text.replace("never", "5s")
    result = load({"apps/a.yaml": fixed})
    assert result.ok
    assert result.apps["api"].run is not None
    assert result.apps["api"].run.stop_timeout == 5.0
    assert result.apps["api"].run.env == {"A": "b"}


def test_merge_of_a_list_locates_merged_keys_at_their_anchor() -> None:
    text = (
        "x-probe: &probe {tcp: {port: 80}}\n"  # line 1: an unknown top-level helper key
        "x-extra: &extra {timeout: later}\n"
        "name: api\nversion: '1'\n"
        "health:\n  <<: [*probe, *extra]\n"
    )
    assert problems({"apps/a.yaml": text}) == [
        "apps/a.yaml:1:1: x-probe: unknown field 'x-probe'",
        "apps/a.yaml:2:1: x-extra: unknown field 'x-extra'",
        "apps/a.yaml:2:27: health.timeout: invalid duration 'later': use e.g. '500ms', '5s', "
        "'2m', '1h'",
    ]


def test_a_file_with_a_late_syntax_error_holds_its_earlier_apps_and_reports_the_error() -> None:
    result = load({"apps/a.yaml": APP.format(name="first") + "---\nname: [\n"})
    assert [str(p) for p in result.problems] == [
        "apps/a.yaml:5:1: YAML syntax error: did not find expected node content "
        "(while parsing a flow node)"
    ]
    # held, not deployed: a file that was not read in full applies nothing (issue #10)
    assert (sorted(result.apps), sorted(result.invalid)) == ([], ["first"])


def test_an_empty_tree_is_a_problem_not_a_request_to_remove_everything() -> None:
    assert problems({}) == [
        "apps:1:1: no *.yaml or *.yml spec files found; nothing is removed while the spec "
        "tree is empty (to remove every app, keep one YAML file with no documents)"
    ]
    assert problems({"apps/none.yaml": "# every app removed\n"}) == []


# ---- the parse cache -----------------------------------------------------------------


def test_parse_cache_reparses_only_changed_files() -> None:
    cache = ParseCache()
    v1 = [SpecFile("apps/a.yaml", APP.format(name="a").encode(), key="k1"),
          SpecFile("apps/b.yaml", APP.format(name="b").encode(), key="k2")]
    first = load_files(v1, cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    v2 = [v1[0], SpecFile("apps/b.yaml", b"name: b\nversion: '2'\n", key="k3")]
    second = load_files(v2, cache)
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    assert second.apps["a"] is first.apps["a"]
    assert second.apps["b"].version == "2"
    # the same content under another path is parsed again: locations name the path
    load_files([SpecFile("apps/moved.yaml", v1[0].data, key="k1")], cache)
    assert (cache.hits, cache.misses) == (1, 4)


# ---- directories and the node's desired state -------------------------------------------


def test_read_directory_and_validate_path_forms(tmp_path: Path) -> None:
    (tmp_path / "apps" / "sub").mkdir(parents=True)
    (tmp_path / "apps" / ".hidden").mkdir()
    (tmp_path / "apps" / "a.yaml").write_text(APP.format(name="a"))
    (tmp_path / "apps" / "sub" / "b.yml").write_text(APP.format(name="b"))
    (tmp_path / "apps" / "notes.txt").write_text("not a spec")
    (tmp_path / "apps" / ".hidden" / "c.yaml").write_text(APP.format(name="c"))
    files = read_directory(tmp_path, "apps")
    assert [f.path for f in files] == ["apps/a.yaml", "apps/sub/b.yml"]
    assert sorted(load_directory(tmp_path).apps) == ["a", "b"]
    assert resolve_spec_path(tmp_path) == (tmp_path, "apps")
    assert resolve_spec_path(tmp_path / "apps") == (tmp_path / "apps", "")
    assert resolve_spec_path(tmp_path / "apps" / "a.yaml") == (tmp_path / "apps", "a.yaml")
    assert [f.path for f in read_directory(tmp_path / "apps", "a.yaml")] == ["a.yaml"]


def test_read_directory_does_not_read_all_of_a_huge_file(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_bytes(b"#" * (MAX_FILE_BYTES * 3))
    (files,) = read_directory(tmp_path, "")
    assert len(files.data) == MAX_FILE_BYTES + 1
    assert [str(p) for p in load_files([files]).problems] == [
        f"big.yaml:1:1: file is larger than {MAX_FILE_BYTES} bytes; refused"
    ]


def test_git_tree_loads_like_the_directory(tmp_path: Path) -> None:
    """The agent's path: GitSource.spec_files (blob sha as cache key) -> load_files."""
    from reconciler.node.source import GitSource

    repo = make_spec_repo(tmp_path / "specs", {
        "apps/a.yaml": APP.format(name="a"),
        "apps/b.yaml": APP.format(name="b") + "depends_on: [a]\n",
        "README.md": "not a spec",
    })
    source = GitSource(repo.url, "main", tmp_path / "cache")
    try:
        files = source.spec_files(source.fetch(), "apps")
    finally:
        source.close()
    from_git = load_files(files)
    from_dir = load_directory(repo.work)
    assert from_git.apps == from_dir.apps
    assert from_git.sources == from_dir.sources == {"a": ("apps/a.yaml", 1),
                                                    "b": ("apps/b.yaml", 1)}
    assert all(f.key for f in files)


NODE_TREE = {
    "apps/a.yaml": APP.format(name="metrics")
    + "---\n" + APP.format(name="gw") + "nodes: {match: {role: gateway}}\ndepends_on: [api]\n"
    + "---\n" + APP.format(name="api")
    + "---\n" + APP.format(name="edge-cache") + "nodes: {exists: [zone]}\n"
    + "depends_on: [zone-db]\n"
    + "---\n" + APP.format(name="zone-db") + "nodes: {match: {zone: eu}}\n",
    "apps/b.yaml": "name: broken\nversion: 1.5\n",
}


def test_desired_for_node_targets_by_labels_and_invalidates_missing_dependencies() -> None:
    result = load(NODE_TREE)
    # edge-cache (exists: zone) -> zone-db (zone=eu) cannot be proved statically either
    assert [str(p) for p in result.problems] == [
        "apps/a.yaml:15:14: depends_on[0]: 'edge-cache' runs on nodes with zone but its "
        "dependency 'zone-db' only on nodes with zone=eu; target 'zone-db' at least wherever "
        "'edge-cache' runs",
        'apps/b.yaml:2:10: version: 1.5 was read as a number; quote it (version: "1.5") so '
        "YAML keeps it as written",
    ]
    gateway = desired_for_node(result, "n1", {"role": "gateway"}, "rev1")
    assert sorted(gateway.apps) == ["api", "gw", "metrics"]
    assert gateway.invalid == frozenset({"broken"})  # edge-cache does not target n1
    assert gateway.revision == "rev1"
    assert gateway.problems == tuple(result.problems)
    edge = desired_for_node(result, "n2", {"role": "edge", "zone": "us"}, "rev1")
    assert sorted(edge.apps) == ["api", "metrics"]
    assert edge.invalid == frozenset({"broken", "edge-cache"})


def test_node_level_check_catches_what_the_static_check_cannot() -> None:
    # Both use `in`, so the loader proves api's nodes are within db's; a hand-made result
    # that skips that check still gets api invalid where db is not targeted.
    result = load({
        "apps/a.yaml": APP.format(name="api") + "depends_on: [db]\n"
        "nodes: {match: {role: edge}}\n",
        "apps/b.yaml": APP.format(name="db") + "nodes: {match: {role: edge}, absent: [old]}\n",
    })
    assert [str(p) for p in result.problems] == [
        "apps/a.yaml:3:14: depends_on[0]: 'api' runs on nodes with role=edge but its "
        "dependency 'db' only on nodes with role=edge, !old; target 'db' at least wherever "
        "'api' runs"
    ]
    from dataclasses import replace

    lenient = replace(result, problems=[], invalid=frozenset())
    desired = desired_for_node(lenient, "n1", {"role": "edge", "old": "1"}, "r")
    assert desired.apps == {}
    assert desired.invalid == frozenset({"api"})
    assert [str(p) for p in desired.problems] == [
        "apps/a.yaml:3:14: depends_on[0]: its dependency 'db' is not targeted at node 'n1' "
        "(role=edge, !old)"
    ]


SEL = Selector.model_validate


@pytest.mark.parametrize(
    ("narrow", "wide", "implied"),
    [
        (None, None, True),
        (SEL({"match": {"role": "a"}}), None, True),
        (None, SEL({"match": {"role": "a"}}), False),
        (None, SEL({}), True),
        (SEL({"match": {"role": "a", "zone": "x"}}), SEL({"match": {"role": "a"}}), True),
        (SEL({"match": {"role": "a"}}), SEL({"match": {"role": "b"}}), False),
        (SEL({"in": {"role": ["a"]}}), SEL({"match": {"role": "a"}}), True),
        (SEL({"in": {"role": ["a", "b"]}}), SEL({"match": {"role": "a"}}), False),
        (SEL({"match": {"role": "a"}}), SEL({"in": {"role": ["a", "b"]}}), True),
        (SEL({"match": {"role": "a"}}), SEL({"notin": {"role": ["b"]}}), True),
        (SEL({"absent": ["role"]}), SEL({"notin": {"role": ["b"]}}), True),
        (SEL({"notin": {"role": ["b", "c"]}}), SEL({"notin": {"role": ["b"]}}), True),
        (SEL({"exists": ["zone"]}), SEL({"notin": {"zone": ["b"]}}), False),
        (SEL({"match": {"zone": "eu"}}), SEL({"exists": ["zone"]}), True),
        (SEL({"exists": ["zone"]}), SEL({"exists": ["zone"]}), True),
        (SEL({"absent": ["gpu"]}), SEL({"absent": ["gpu"]}), True),
        (SEL({}), SEL({"absent": ["gpu"]}), False),
    ],
)
def test_selector_implication(narrow: Selector | None, wide: Selector | None,
                              implied: bool) -> None:
    assert selector_implies(narrow, wide) is implied


def test_parse_labels() -> None:
    assert parse_labels(["role=gateway", "zone = eu-1", "empty="]) == {
        "role": "gateway", "zone": "eu-1", "empty": ""}
    for bad, message in [
        ("role", "label 'role': expected KEY=VALUE, e.g. role=gateway"),
        ("=x", "label '=x': invalid key ''"),
        ("role=a b", "label 'role=a b': invalid value 'a b'"),
    ]:
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
            parse_labels([bad])
    with pytest.raises(ValueError, match="label 'role' given twice: 'a' and 'b'"):
        parse_labels(["role=a", "role=b"])


@pytest.mark.parametrize(
    ("data", "last"),
    [
        (b"--- {}\n" * 1000, "apps/many.yaml:50:5: 100 problems so far; stopped reading this file"),
        (b"---\n" * 2000, "apps/many.yaml:1001:1: more than 1000 documents in one file; refused"),
        (b"a: 1\n" * 1000, "apps/many.yaml:102:1: 100 problems so far; stopped reading this file"),
        (b"x: [" + b"1, " * 60_000 + b"]\n",
         "apps/many.yaml:1:150002: more than 50000 YAML nodes in one file; refused"),
    ],
    ids=["many-bad-documents", "many-documents", "many-duplicate-keys", "many-nodes"],
)
def test_work_per_file_is_bounded(data: bytes, last: str) -> None:
    found = problems({"apps/many.yaml": data})
    assert last in found
    assert len(found) <= 102


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param("".join(f"---\nname: extra{i}\nversion: '1'\n" for i in range(2)),
                     id="too-many-documents"),
        pytest.param("---\nname: broken\nversion: [\n", id="yaml-error-later-in-the-file"),
    ],
)
def test_a_file_that_is_not_read_in_full_deploys_nothing(tail: str) -> None:
    """A refused file's first documents must not count as valid apps (they were deployed
    before: the first 1,000 apps of a 1,001-document file). They are held as invalid, so a
    running app of that name is kept as it is and nothing new starts."""
    from reconciler.core.loader import MAX_DOCUMENTS
    from reconciler.core.plan import make_plan
    from reconciler.core.state import CurrentState

    count = MAX_DOCUMENTS - 1 if "extra0" in tail else 3
    big = "".join(f"---\nname: app{i}\nversion: '1'\n" for i in range(count)) + tail
    result = load({"apps/big.yaml": big, "apps/ok.yaml": APP.format(name="ok")})
    assert sorted(result.valid_apps) == ["ok"]
    assert {"app0", f"app{count - 1}"} <= result.invalid
    assert len(result.problems) == 1 and result.problems[0].path == "apps/big.yaml"
    desired = desired_for_node(result, "n1", {}, "r1")
    plan = make_plan(desired, CurrentState())
    assert [(a.kind.value, a.app) for a in plan.actions] == [("deploy", "ok")]


SHELL_FORMS = [
    pytest.param("run:\n  command: 'echo hi | cat'\n  shell: true\n", ["echo hi | cat"], None,
                 id="one-string"),
    pytest.param("run:\n  command: ['echo hi | cat']\n  shell: true\n", ["echo hi | cat"], None,
                 id="one-item-list"),
    pytest.param("run:\n  command: 'echo hi'\n", None,
                 "apps/a.yaml:4:3: run: command is a string, i.e. a shell command line: give an "
                 "argv list, or set shell: true", id="string-without-shell"),
    pytest.param("run:\n  command: [echo, hi]\n  shell: true\n", None,
                 "apps/a.yaml:4:3: run: with shell: true, command is one string run by /bin/sh -c",
                 id="argv-with-shell"),
]


@pytest.mark.parametrize(("run", "command", "error"), SHELL_FORMS)
def test_shell_true_takes_one_string_as_the_docs_say(
    run: str, command: list[str] | None, error: str | None
) -> None:
    result = load({"apps/a.yaml": APP.format(name="job") + run})
    if error is None:
        assert result.ok, result.problems
        assert result.apps["job"].run is not None
        assert result.apps["job"].run.command == command
    else:
        assert [str(p) for p in result.problems] == [error]


def test_the_schema_shows_both_command_forms() -> None:
    from reconciler.core.spec import app_json_schema

    schema = app_json_schema()
    command = schema["$defs"]["RunSpec"]["properties"]["command"]
    assert {"type": "string", "minLength": 1} in command["anyOf"]
    assert any(alt.get("type") == "array" for alt in command["anyOf"])


@pytest.mark.parametrize(
    ("run", "error"),
    [
        pytest.param('run:\n  command: [app]\n  env: {TOKEN: "a\\0b"}\n',
                     "apps/a.yaml:4:3: run: env TOKEN: a NUL byte in the value", id="env-value"),
        pytest.param('run:\n  command: [app, "x\\0"]\n',
                     "apps/a.yaml:4:3: run: a NUL byte in command, env_files or workdir",
                     id="argument"),
        pytest.param('health:\n  exec: {command: ["ch\\0eck"]}\n',
                     "apps/a.yaml:4:9: health.exec: a NUL byte in command", id="probe"),
    ],
)
def test_a_nul_byte_is_a_validation_error_not_a_start_failure(run: str, error: str) -> None:
    """Issue #10.2: it surfaced as `internal error: ValueError` when the app started."""
    assert problems({"apps/a.yaml": APP.format(name="job") + run}) == [error]


def test_labels_and_layers_are_bounded_like_kubernetes_labels() -> None:
    """Issue #10.4: 200 apps with long labels passed validate and their node's status no
    longer fitted one message."""
    long_value = "x" * 64
    many = ", ".join(f"k{i}: v" for i in range(33))
    text = APP.format(name="a") + f"labels: {{team: {long_value}}}\n"
    assert problems({"apps/a.yaml": text}) == [
        f"apps/a.yaml:3:16: labels.team: invalid label 'team' value '{long_value}': at most 63 "
        "letters, digits, '.', '_', '-' (like Kubernetes labels; status carries them)"]
    assert problems({"apps/a.yaml": APP.format(name="a") + f"labels: {{{many}}}\n"}) == [
        "apps/a.yaml:3:9: labels: Dictionary should have at most 32 items after validation, "
        "not more"]
    assert problems({"apps/a.yaml": APP.format(name="a") + "layer: 'two words'\n"}) == [
        "apps/a.yaml:3:8: layer: invalid layer value 'two words': at most 63 letters, digits, "
        "'.', '_', '-' (like Kubernetes labels; status carries them)"]
