"""console.history against real git repos: commits with subject, author, time and the apps
each changed; refreshed after a push; failures kept as a message, never raised."""

from __future__ import annotations

from pathlib import Path

from console.history import GitHistory
from tests.conftest import git, make_spec_repo


def app_yaml(name: str, version: str) -> str:
    return f"name: {name}\nversion: \"{version}\"\nrun:\n  command: [\"true\"]\n"


def test_history_lists_commits_with_the_apps_they_changed(tmp_path: Path) -> None:
    repo = make_spec_repo(tmp_path / "specs", {"apps/web.yaml": app_yaml("web", "1"),
                                               "apps/db.yml": app_yaml("db", "1")})
    history = GitHistory(repo.url, "main", tmp_path / "cache.git", timeout=20)
    history.refresh()
    assert history.last_error is None
    (first,) = history.commits()
    assert (first["subject"], first["author"], first["apps"]) == (
        "initial specs", "test", ["db", "web"])

    repo.write("apps/web.yaml", app_yaml("frontend", "2"))  # renamed inside the file
    repo.write("README.md", "docs only\n")
    repo.commit_and_push("web 2")
    git(repo.work, "rm", "-q", "apps/db.yml")
    repo.commit_and_push("drop db")
    history.refresh()
    assert [(c["subject"], c["apps"]) for c in history.commits()] == [
        ("drop db", ["db"]), ("web 2", ["frontend", "web"]), ("initial specs", ["db", "web"])]
    head = repo.head()
    assert history.commit(head[:8]) == history.commits()[0]
    assert history.commits()[1]["files"] == ["README.md", "apps/web.yaml"]
    assert history.view(head[:7])["selected"] == head
    assert history.commits()[0]["time"].endswith("Z")


def test_a_repo_that_cannot_be_read_is_an_error_message(tmp_path: Path) -> None:
    history = GitHistory(f"file://user:secret@{tmp_path}/nope.git", None,
                         tmp_path / "cache.git", timeout=20)
    history.refresh()
    assert history.commits() == []
    assert history.last_error is not None and "secret" not in history.last_error
    assert "nope.git" in history.last_error
