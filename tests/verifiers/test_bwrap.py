"""The bubblewrap command: an interpreter under /tmp or /run is shown read-only and alone (never the host's /tmp),
every mount in the private /tmp is one of its top-level entries (what the reused sandbox's cleanup skips), and the
sandbox is shown the interpreter's own paths only, not the caller's PYTHONPATH or script directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prime_jax.verifiers import bwrap

REPO = Path(__file__).resolve().parents[2]
_ONE_ARG = {"--tmpfs", "--dir", "--remount-ro", "--perms", "--size", "--dev", "--proc", "--chdir", "--cap-drop",
            "--cap-add"}


def _ops(argv: list[str]) -> list[tuple[str, ...]]:
    """bwrap options as (option, arguments...) tuples."""
    assert argv[0] == "bwrap"
    ops, i = [], 1
    while i < len(argv):
        width = 2 if argv[i] == "--ro-bind" else 1 if argv[i] in _ONE_ARG else 0
        ops.append(tuple(argv[i:i + 1 + width]))
        i += 1 + width
    return ops


@pytest.mark.parametrize("drop_uid", [False, True])
def test_an_interpreter_under_tmp_or_run_is_shown_read_only_and_alone(monkeypatch: pytest.MonkeyPatch,
                                                                      drop_uid: bool) -> None:
    needed = ["/opt/py", "/run/user/7/py/lib", "/tmp/clone", "/tmp/clone/.venv/lib", "/tmp/x/a/venv", "/tmp/x/b/lib"]
    monkeypatch.setattr(bwrap, "needed_paths", lambda: needed)
    ops = _ops(bwrap.command(1 << 20, drop_uid))
    mounts = [op for op in ops if op[0] in ("--ro-bind", "--tmpfs")]
    binds = {op[2] for op in mounts if op[0] == "--ro-bind"}
    tmpfs = [op[1] for op in mounts if op[0] == "--tmpfs"]
    # Only what the interpreter needs is bound: never the host's /tmp or /run themselves, nor /tmp/x's other files.
    assert binds == {"/", "/tmp/clone", "/tmp/x/a/venv", "/tmp/x/b/lib", "/run/user/7/py/lib"}
    assert all(op[1] == op[2] for op in mounts if op[0] == "--ro-bind")
    # Directories holding them are tmpfs mounts of their own (top-level entries of /tmp and /run), read-only once
    # the binds are in place; the private /tmp is the only writable place.
    assert [p for p in tmpfs if p.startswith(("/tmp/", "/run/"))] == ["/tmp/x", "/run/user"]
    for root in ("/tmp/x", "/run/user", "/run"):
        remount = ops.index(("--remount-ro", root))
        assert remount > max(i for i, op in enumerate(ops) if op[0] == "--ro-bind" and op[2].startswith(root + "/"))
    assert ("--remount-ro", "/tmp") not in ops
    # Every mount under /tmp is a top-level entry of it or lies inside one (the zygote's cleanup skips those entries
    # by device number, so it never walks into the interpreter's files).
    points = {op[-1] for op in mounts}
    assert all("/".join(p.split("/")[:3]) in points for p in points if p.startswith("/tmp/"))


@pytest.fixture
def fresh_paths():
    """`needed_paths` / `interpreter_path` computed afresh in the test (again after it)."""
    bwrap.needed_paths.cache_clear()
    bwrap.interpreter_path.cache_clear()
    yield
    bwrap.needed_paths.cache_clear()
    bwrap.interpreter_path.cache_clear()


@pytest.mark.usefixtures("fresh_paths")
def test_the_sandbox_is_shown_the_interpreters_paths_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A script run from /tmp puts /tmp on sys.path; PYTHONPATH may add anything: none of it is bound in."""
    monkeypatch.setattr(sys, "path", ["", "/tmp", "/tmp/scripts", str(REPO), *sys.path])
    needed, path = bwrap.needed_paths(), bwrap.interpreter_path()
    assert not {"/tmp", "/tmp/scripts", str(REPO)} & set(needed + path)
    prefix = str(Path(sys.prefix).resolve())
    assert prefix in needed and all(p.startswith(tuple(needed)) for p in path)
    binds = {op[1] for op in _ops(bwrap.command(1 << 20, False)) if op[0] == "--ro-bind"}
    assert not {"/tmp", "/tmp/scripts", str(REPO)} & binds
