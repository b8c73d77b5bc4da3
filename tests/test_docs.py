"""The docs' examples are real: the spec example validates, the README starts with its commands."""

from __future__ import annotations

import re
from pathlib import Path

from reconciler.core.loader import SpecFile, load_files

ROOT = Path(__file__).resolve().parent.parent


def test_the_complete_example_in_specs_md_is_a_valid_app() -> None:
    text = (ROOT / "docs" / "specs.md").read_text()
    match = re.search(r"## A complete example\n\n```yaml\n(.*?)```", text, re.S)
    assert match, "docs/specs.md lost its complete example"
    files = [
        SpecFile("apps/api.yaml", match.group(1).encode()),
        # the example's dependencies, so the tree as a whole checks out
        SpecFile("apps/deps.yaml", b'name: db\nversion: "1"\n---\nname: cache\nversion: "1"\n'),
    ]
    result = load_files(files)
    assert [str(p) for p in result.problems] == []
    api = result.apps["api"]
    assert (api.version, api.depends_on, api.nodes is not None, api.health.probe_kind) == (
        "2.3.1", ["db", "cache"], True, "http",
    )


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith(
        "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . "
        "&& .venv/bin/gitops-mesh demo"
    )
    assert (ROOT / "constraints.txt").is_file()
    assert lines[4].startswith("bash .ci/run")


def test_docs_link_to_files_that_exist() -> None:
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([A-Za-z0-9_./-]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_the_rollout_example_in_specs_md_and_specs_example_are_valid() -> None:
    from reconciler.core.rollout_spec import parse_rollout

    text = (ROOT / "docs" / "specs.md").read_text()
    match = re.search(r"## `rollout.yaml`: fleet rollouts\n.*?```yaml\n(.*?)```", text, re.S)
    assert match, "docs/specs.md lost its rollout.yaml example"
    for data in (match.group(1).encode(), (ROOT / "specs-example" / "rollout.yaml").read_bytes()):
        spec, problems = parse_rollout("rollout.yaml", data)
        assert problems == [] and spec is not None
        assert [w.name for w in spec.waves] == ["canary", "fleet"]
        assert spec.wave_of({"ring": "canary"}) == 0 and spec.wave_of({}) == 1
