"""`scripts/proto.py breaking`: which commit a change is compared with, and a missing one
failing the step instead of passing it silently."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _proto_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_script", REPO / "scripts" / "proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


proto = _proto_script()

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=GIT_ENV, check=True
    )
    return done.stdout.strip()


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(name)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", name)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    return path


def test_main_is_compared_with_its_parent_and_a_branch_with_main(repo: Path) -> None:
    first = commit(repo, "a")
    assert proto.breaking_baseline("main", repo) is None  # nothing before the first commit
    second = commit(repo, "b")
    assert proto.breaking_baseline("main", repo) == first
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "c")
    commit(repo, "d")
    assert proto.breaking_baseline("main", repo) == second
    # main moved on after the branch forked: the fork point, not main's new head.
    git(repo, "checkout", "-q", "main")
    commit(repo, "e")
    git(repo, "checkout", "-q", "feature")
    assert proto.breaking_baseline("main", repo) == second


def test_a_clone_finds_main_as_origin_main(repo: Path, tmp_path: Path) -> None:
    commit(repo, "a")
    base = commit(repo, "b")
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", "-b", "main", str(repo), str(clone)], check=True, env=GIT_ENV
    )
    assert proto.breaking_baseline("main", clone) == git(repo, "rev-parse", "HEAD~1")
    git(clone, "checkout", "-q", "-b", "pr")
    git(clone, "branch", "-q", "-D", "main")  # a PR checkout without a local main
    commit(clone, "c")
    assert proto.breaking_baseline("main", clone) == base


def test_missing_baselines_fail_loudly(repo: Path, tmp_path: Path) -> None:
    commit(repo, "a")
    commit(repo, "b")
    with pytest.raises(proto.MissingBaseline, match="BUF_AGAINST=none"):
        proto.breaking_baseline("no-such-branch", repo)
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)],
        check=True,
        env=GIT_ENV,
    )
    with pytest.raises(proto.MissingBaseline, match="parent"):
        proto.breaking_baseline("main", shallow)


def test_breaking_step_fails_on_a_missing_ref_unless_none() -> None:
    assert proto.breaking("no-such-branch-anywhere") != 0
    assert proto.breaking("none") == 0
