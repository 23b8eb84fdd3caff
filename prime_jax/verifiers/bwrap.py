"""The command that starts the harness in a bubblewrap sandbox, and what the sandbox can see.

The sandbox sees the host's root read-only, its own /dev and /proc, a private size-capped /tmp (the only
place the program may write, emptied between runs of a reused sandbox), an empty read-only /run, no network
and its own PID, IPC and UTS namespaces; it dies with its parent. The harness starts as `python -I -S` with
the host's exact interpreter path (`interpreter_path`), so the sandbox must show the interpreter's files
(`needed_paths`: its executable, prefixes and library directories) and nothing else of what it hides.

An interpreter under /tmp or /run (a fresh clone's .venv in /tmp, say) lies in a directory the sandbox
replaces: each topmost entry there that holds its files comes back as a read-only bind of that entry, or as
an empty tmpfs of its own, remounted read-only, holding read-only binds of just those files. So the program
sees none of the host's /tmp but the interpreter, cannot write next to it, and every mount in the private /tmp
is one of its top-level entries, which the reused sandbox's cleanup (`harness._reap`) skips by device number.
Run as root, the same is done for a directory others may not traverse (/root holding a pyenv): the harness
drops to a uid of its own, which must still reach the interpreter.
"""

from __future__ import annotations

import functools
import marshal
import os
import signal
import stat
import subprocess
import sys

from prime_jax.verifiers import harness as _harness_module

MASKED = ("/tmp", "/run")  # replaced by empty tmpfs inside the sandbox

# Runs the harness: harness.py's code object (marshal, trusted: sent by the host) is the first
# argv[1] bytes of stdin; the payload follows. Saves compiling the file in every sandbox.
_BOOTSTRAP = (
    "import marshal, sys; sys.path[:] = {path!r}; "
    "exec(marshal.loads(sys.stdin.buffer.read(int(sys.argv[1]))), {{'__name__': '__main__'}})"
)


@functools.cache
def harness_code() -> bytes:
    """harness.py compiled once per process (marshal), for `_BOOTSTRAP` to run as `__main__`."""
    path = _harness_module.__file__
    with open(path, encoding="utf-8") as f:
        return marshal.dumps(compile(f.read(), path, "exec"))


def harness_argv(code: bytes, *extra: str) -> list[str]:
    """The interpreter command that runs the harness whose `code` comes first on its stdin."""
    return [sys.executable, "-I", "-S", "-c", _BOOTSTRAP.format(path=interpreter_path()), str(len(code)), *extra]


@functools.cache
def interpreter_path() -> list[str]:
    """The harness's sys.path: this interpreter's standard library and site-packages directories
    (what `site` would add), resolved, without the working directory or PYTHONPATH entries."""
    prefixes = _prefixes()
    resolved = (os.path.realpath(p) for p in sys.path if p)
    return list(dict.fromkeys(p for p in resolved if (p + "/").startswith(tuple(q + "/" for q in prefixes))))


def _prefixes() -> list[str]:
    return sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix)})


@functools.cache
def needed_paths() -> list[str]:
    """Paths (resolved) the sandboxed interpreter must be able to read: its executable, prefixes and
    `interpreter_path`. Never a directory the sandbox replaces itself (/tmp as a prefix would expose the host's)."""
    paths = {os.path.realpath(sys.executable), *_prefixes(), *interpreter_path()}
    return sorted(p for p in paths if p not in MASKED and p != "/" and os.path.exists(p))


def command(tmp_bytes: int, drop_uid: bool) -> list[str]:
    """bubblewrap command prefix: read-only root, private /tmp, empty read-only /run, no network, own PID
    namespace; the interpreter's files shown where they lie (also under /tmp or /run)."""
    args = [
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
        "--tmpfs", "/run",
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--chdir", "/tmp",
    ]  # fmt: skip
    needed = needed_paths()
    for masked in MASKED:
        args += _expose_under(masked, [p for p in needed if p.startswith(masked + "/")])
    args += ["--remount-ro", "/run"]
    outside = [p for p in needed if not any(p.startswith(m + "/") for m in MASKED)]
    if drop_uid:
        # bwrap keeps root's capabilities unless told otherwise; the harness needs only these two
        # to switch to its own uid, after which it has none.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        for root, paths in _blocked_ancestors(outside).items():
            args += _read_only_tmpfs(root, paths)
    else:
        args += ["--unshare-user"]
    return args


def _expose_under(root: str, paths: list[str]) -> list[str]:
    """bwrap arguments showing `paths` (read-only) inside `root`, an empty tmpfs in the sandbox: per topmost
    entry of `root` that holds some, a read-only bind of the entry if it is needed whole, else a read-only
    tmpfs with binds of just the paths. Every mount they add is a top-level entry of `root`."""
    by_entry: dict[str, list[str]] = {}
    for path in paths:
        by_entry.setdefault(root + "/" + path[len(root) + 1 :].split("/")[0], []).append(path)
    args: list[str] = []
    for entry, under in sorted(by_entry.items()):
        args += ["--ro-bind", entry, entry] if entry in under else _read_only_tmpfs(entry, under)
    return args


def _read_only_tmpfs(root: str, paths: list[str]) -> list[str]:
    """bwrap arguments replacing `root` by an empty tmpfs that shows only `paths` (read-only binds under it),
    remounted read-only once they are in place: nothing can be written there."""
    return ["--perms", "0755", "--tmpfs", root] + _rebind(root, paths) + ["--remount-ro", root]


def _blocked_ancestors(paths: list[str]) -> dict[str, list[str]]:
    """For each topmost directory others cannot traverse: the needed paths under it."""
    blocked: dict[str, list[str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            try:
                mode = os.stat(ancestor).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH:
                blocked.setdefault(ancestor, []).append(path)
                break
    return blocked


def _rebind(root: str, paths: list[str]) -> list[str]:
    """bwrap arguments re-exposing `paths` (read-only) inside `root`, which is an empty tmpfs there."""
    args: list[str] = []
    made: set[str] = set()
    kept = [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]
    for path in kept:
        parts = path[len(root) :].strip("/").split("/")
        for depth in range(1, len(parts)):
            directory = root + "/" + "/".join(parts[:depth])
            if directory not in made:
                made.add(directory)
                args += ["--perms", "0755", "--dir", directory]
        args += ["--ro-bind", path, path]
    return args


def sandbox_env(home: str) -> dict[str, str]:
    """The harness's whole environment (nothing of the caller's)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (bwrap takes its PID namespace down with it) and reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
    proc.wait()
