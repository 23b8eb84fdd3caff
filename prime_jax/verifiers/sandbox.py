"""Run untrusted Python code against tests in an isolated process, with results it cannot forge: the host side.

`run_tests` runs the harness (harness.py, compiled once) under bubblewrap (no network, read-only root,
private size-capped /tmp, own PID namespace, dies with its parent, new session); sends the program,
the tests and a random per-run nonce to it; reads per-test reports from a pipe; gives every test a
wall-clock deadline; and after a crash continues at the next test in a fresh process. The harness
starts as `python -I -S` with the host's exact sys.path (no `site` import, nothing from `.pth` files
or the environment). Each calling process keeps one such sandbox waiting (a zygote, with the
program header's modules imported): a run is a fork of it, and once the run's process has exited
the zygote kills every process it left and empties /tmp and /dev/shm before the next run; a run that
times out or floods the channel takes the whole sandbox down, and the next run starts a new one.

Fails closed: without a working bubblewrap `run_tests` raises `SandboxUnavailable` and runs nothing,
unless the caller passes `allow_unsandboxed=True` (config `verifier.allow_unsandboxed`, unsafe). Then
the harness confines itself with rlimits only, and, when started as root, switches to a uid of its
own, which cannot signal the caller's processes or write the caller's files; a non-root caller's
uid is kept, so the program could signal the caller.

Why the results can be trusted:
- A test counts only if a channel line carrying this run's nonce reports it, in order. The nonce
  reaches the harness on stdin, which is drained and replaced by /dev/null before any candidate
  code runs; it is in no file, argument, environment variable or pipe the candidate can read.
  Exiting early (`sys.exit`, `os._exit`), printing markers, closing or flooding the channel, or
  killing processes all end in missing reports, i.e. failures.
- Stdin/stdout and call-based tests report outputs only; the expected outputs never enter the
  sandbox and are compared on the host.
- Tests run with a fresh copy of the builtins taken before the candidate ran, so patching
  `builtins` changes nothing they see; after the candidate starts, the harness uses only
  references it bound beforehand.
Residual risks: assert-style tests necessarily run inside the candidate's interpreter, so a
candidate that digs the harness's reporter or nonce out of its memory (gc, frames) or returns
objects whose `__eq__` always says True could still fake a pass there. Expected-output tests are
not exposed to that, but the read-only root is readable: expected outputs stored in a dataset
file that the sandbox uid may read could be looked up. Runs in one zygote share its IPC namespace
(System V objects a run creates outlive it) and its interpreter's state as of the fork.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import marshal
import math
import os
import platform
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from prime_jax.verifiers import harness as _harness_module

MODES = ("stdio", "call", "assert")
BWRAP_INSTALL = "sudo apt-get install -y bubblewrap"
# Tasks a user may own count against RLIMIT_NPROC per user namespace from Linux 5.14 on.
_PER_USERNS_NPROC_KERNEL = (5, 14)
# Root drops each sandbox to uid/gid = base + caller pid, so concurrent sandboxes never share
# an RLIMIT_NPROC count (the kernel ignores that limit for root itself).
_SANDBOX_UID_BASE = 200_000
_STARTUP_GRACE_S = 2.0  # interpreter start-up, on top of the load deadline
_BWRAP_MASKED = ("/tmp", "/run")  # replaced by empty tmpfs inside the sandbox


class SandboxUnavailable(RuntimeError):
    """No working bubblewrap here and running without it was not allowed: nothing was run."""


# Runs the harness: harness.py's code object (marshal, trusted: sent by the host) is the first
# argv[1] bytes of stdin; the payload follows. Saves compiling the file in every sandbox.
_BOOTSTRAP = (
    "import marshal, sys; sys.path[:] = {path!r}; "
    "exec(marshal.loads(sys.stdin.buffer.read(int(sys.argv[1]))), {{'__name__': '__main__'}})"
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    timeout_s: wall-clock seconds per test (the same again for loading the program).
    memory_bytes: address space (RLIMIT_AS). max_processes: tasks, threads included (RLIMIT_NPROC).
    file_size_bytes: largest file the program may write (RLIMIT_FSIZE), stdout of a stdin test included.
    max_output_bytes: largest output one test may report. tmp_bytes: size of the private /tmp.
    max_open_files: RLIMIT_NOFILE. recursion_limit: Python recursion limit of the program.
    """

    timeout_s: float = 5.0
    memory_bytes: int = 2 << 30
    max_processes: int = 32
    file_size_bytes: int = 16 << 20
    max_output_bytes: int = 1 << 20
    tmp_bytes: int = 64 << 20
    max_open_files: int = 256
    recursion_limit: int = 100_000


@dataclasses.dataclass(frozen=True)
class Program:
    """Candidate code plus the tests to run against it.

    mode "stdio": tests are stdin texts; each run executes `source` as `__main__`, output = stdout.
    mode "call": tests are positional-argument lists for `fn_name` (or `Solution().<fn_name>`),
      output = the JSON of the return value.
    mode "assert": tests are Python statements run after `prelude`; no exception = pass.
    `header` runs before `source`, in the same namespace (imports the program may rely on).
    """

    mode: str
    source: str
    tests: Sequence
    header: str = ""
    prelude: str = ""
    fn_name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Program.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "call" and not self.fn_name:
            raise ValueError("Program.mode 'call' needs fn_name")


@dataclasses.dataclass(frozen=True)
class TestResult:
    """Outcome of one test: status "pass" | "fail" | "output" | "timeout" | "crash".

    "output" means the program finished the test and `output` holds what it produced (stdio / call
    modes); whether that output is right is decided by the caller.
    """

    status: str
    output: str = ""
    detail: str = ""

    __test__ = False  # not a pytest test class


@dataclasses.dataclass
class _Launch:
    """What one sandbox launch reported."""

    results: dict[int, TestResult]
    loaded: bool = False
    load_detail: str = ""
    timed_out: bool = False
    abandoned: bool = False  # stopped waiting while the harness may still run (deadline, too much output)
    child_ended: bool = False  # a zygote said its child has exited and been cleaned up after


def run_tests(program: Program, limits: Limits = Limits(), *, allow_unsandboxed: bool = False,
              reuse_sandbox: bool = True) -> list[TestResult]:
    """Run every test of `program` in order; one TestResult per test.

    With bubblewrap, runs fork from this process's waiting sandbox (a zygote), which kills what a
    run left behind and empties its temp dirs before the next; `reuse_sandbox=False` starts a fresh
    sandbox and interpreter instead (slower; bench/verifiers.py compares the two). The interpreter or
    code living under a directory the sandbox replaces (/tmp, /run: bound back into the private tmpfs)
    also gets a fresh sandbox per run: a zygote left processes behind there (seen with a checkout in /tmp).

    Without a working bubblewrap this raises `SandboxUnavailable` (nothing runs) unless
    `allow_unsandboxed` (rlimits, and a uid of its own when root, only: unsafe).

    Tests run one after another in a sandboxed process; a test that crashes the process or
    passes its deadline is recorded as "crash"/"timeout" and a fresh sandbox continues with the
    next test. If the program fails to load (syntax error, exception at top level, dies before
    its first test) every remaining test fails without retrying.
    """
    problem = sandbox_problem()
    if problem is not None and not allow_unsandboxed:
        raise SandboxUnavailable(f"{problem}; install it ({BWRAP_INSTALL}) or allow unsandboxed runs (unsafe)")
    use_bwrap = problem is None
    n = len(program.tests)
    results: list[TestResult | None] = [None] * n
    start = 0
    while start < n:
        launch = _launch(program, start, limits, use_bwrap, reuse_sandbox and not _needs_masked_binds())
        for index, result in launch.results.items():
            results[index] = result
        if not launch.loaded:
            for index in range(start, n):
                results[index] = results[index] or TestResult("fail", detail=f"load failed: {launch.load_detail}")
            break
        start = next((i for i in range(start, n) if results[i] is None), n)
        if start < n:
            results[start] = TestResult("timeout" if launch.timed_out else "crash")
            start += 1
    return [r for r in results if r is not None]


@functools.cache
def sandbox_problem() -> str | None:
    """None if bubblewrap sandboxes work here, else why not: probed once per process by a real
    harness run (`sandbox_problem.cache_clear()` probes again)."""
    if not shutil.which("bwrap"):
        return "bwrap (bubblewrap) is not installed"
    probe = Program("assert", "x = 1", ["assert x == 1"])
    launch = _launch(probe, 0, Limits(timeout_s=30.0), use_bwrap=True, reuse=False)
    if launch.results.get(0) == TestResult("pass"):
        return None
    return "bwrap is installed but cannot create a sandbox here (are user namespaces disabled?)"


def bwrap_available() -> bool:
    """Whether bubblewrap sandboxes work here."""
    return sandbox_problem() is None


def _payload(program: Program, start: int, limits: Limits, use_bwrap: bool, uid: int | None) -> dict:
    """What the harness needs for one run over tests[start:] (its `channel_fd` is set by the caller)."""
    remaining = len(program.tests) - start
    return {
        "nonce": secrets.token_hex(16),
        "mode": program.mode,
        "source": program.source,
        "header": program.header,
        "prelude": program.prelude,
        "fn_name": program.fn_name,
        "tests": list(program.tests),
        "start": start,
        "uid": uid,
        "in_bwrap": use_bwrap,
        "recursion_limit": limits.recursion_limit,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_s": math.ceil(limits.timeout_s * (remaining + 1) + _STARTUP_GRACE_S),
            "nproc": _process_limit(limits.max_processes, use_bwrap, uid),
            "file_size_bytes": limits.file_size_bytes,
            "max_open_files": limits.max_open_files,
            "max_output_bytes": limits.max_output_bytes,
        },
    }


def _launch(program: Program, start: int, limits: Limits, use_bwrap: bool, reuse: bool) -> _Launch:
    """One sandboxed harness run over tests[start:]: in this process's reusable sandbox when
    `reuse` (and bubblewrap, and no other thread of this process is using it), else in a fresh one."""
    uid = _sandbox_uid()
    payload = _payload(program, start, limits, use_bwrap, uid)
    if use_bwrap and reuse and _ZYGOTE_LOCK.acquire(blocking=False):
        try:
            return _launch_in_zygote(payload, len(program.tests), limits, uid)
        finally:
            _ZYGOTE_LOCK.release()
    return _launch_fresh(payload, len(program.tests), limits, use_bwrap, uid)


def _harness_argv(code: bytes, *extra: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _BOOTSTRAP.format(path=_interpreter_path()), str(len(code)), *extra]


def _launch_fresh(payload: dict, n: int, limits: Limits, use_bwrap: bool, uid: int | None) -> _Launch:
    """A new sandbox (interpreter start-up included) for this run alone, killed at its end."""
    read_fd, write_fd = os.pipe()
    payload["channel_fd"] = write_fd
    code = _harness_code()
    with contextlib.ExitStack() as cleanup:
        if use_bwrap:
            argv, cwd = _bwrap_argv(limits.tmp_bytes, uid is not None) + _harness_argv(code), "/"
        else:  # a private working directory at least
            cwd = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="prime_jax_sandbox_"))
            argv = _harness_argv(code)
            if uid is not None:
                os.chown(cwd, uid, uid)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd=cwd,
                env=_sandbox_env("/tmp" if use_bwrap else cwd),
            )
        finally:
            os.close(write_fd)
        try:
            stdin = code + json.dumps(payload).encode()
            return _collect(read_fd, proc.stdin, stdin, payload, n, limits, status_fd=None)
        finally:
            _kill_group(proc)
            os.close(read_fd)


@dataclasses.dataclass
class _Zygote:
    """A bubblewrap sandbox whose harness waits for payloads and forks one child per run
    (`harness._zygote_main`): no sandbox or interpreter start-up per run."""

    proc: subprocess.Popen
    channel: int  # read end of the report pipe its children share (nonce-tagged reports)
    channel_fd: int  # the write end's number inside the sandbox
    key: tuple  # (tmp_bytes, uid) it was started with
    owner: int  # the pid of the process that started it (a forked copy of this module starts its own)
    idle: bool = True  # no child running or being cleaned up after


_zygote: _Zygote | None = None
_ZYGOTE_LOCK = threading.Lock()


def _launch_in_zygote(payload: dict, n: int, limits: Limits, uid: int | None) -> _Launch:
    """The run in this process's zygote (started, or restarted, as needed). A timed-out or flooding
    run takes its zygote down with it; the next run starts a fresh one."""
    global _zygote
    key = (limits.tmp_bytes, uid)
    zygote = _zygote if _zygote is not None and _zygote.owner == os.getpid() else None
    if zygote is not None and (zygote.key != key or not _await_idle(zygote, limits.timeout_s + _STARTUP_GRACE_S)):
        _stop_zygote(zygote)
        zygote = None
    if zygote is None:
        zygote = _zygote = _start_zygote(key)
    payload["channel_fd"] = zygote.channel_fd
    body = json.dumps(payload).encode()
    zygote.idle = False
    try:
        launch = _collect(zygote.channel, zygote.proc.stdin, b"%d\n" % len(body) + body, payload, n, limits,
                          status_fd=zygote.proc.stdout.fileno())
    except BaseException:
        _stop_zygote(zygote)
        raise
    if launch.child_ended:
        zygote.idle = True
    if launch.abandoned or zygote.proc.poll() is not None:
        _stop_zygote(zygote)
    return launch


def _start_zygote(key: tuple) -> _Zygote:
    tmp_bytes, uid = key
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    code = _harness_code()
    try:
        proc = subprocess.Popen(
            _bwrap_argv(tmp_bytes, uid is not None) + _harness_argv(code, "zygote"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
            env=_sandbox_env("/tmp"),
        )
    finally:
        os.close(write_fd)
    proc.stdin.write(code)
    proc.stdin.flush()
    return _Zygote(proc, read_fd, write_fd, key, os.getpid())


def _await_idle(zygote: _Zygote, timeout_s: float) -> bool:
    """Whether the zygote has finished cleaning up after its last child (waits up to `timeout_s`)."""
    if zygote.idle:
        return True
    status = zygote.proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(status, selectors.EVENT_READ)
        if selector.select(timeout_s) and os.read(status, 64):
            zygote.idle = True
    return zygote.idle


def _stop_zygote(zygote: _Zygote) -> None:
    global _zygote
    _kill_group(zygote.proc)
    zygote.proc.stdout.close()
    os.close(zygote.channel)
    if _zygote is zygote:
        _zygote = None


def _collect(read_fd: int, stdin, data: bytes, payload: dict, n: int, limits: Limits, status_fd: int | None) -> _Launch:
    """Send `data` on `stdin`, read nonce-tagged reports until every test reported, the harness
    ended (channel EOF, or a line on `status_fd` from a zygote), a deadline, or too much output."""
    launch = _Launch(results={})
    nonce, start = payload["nonce"], payload["start"]
    expected = start
    budget = (n - start + 1) * (2 * limits.max_output_bytes + 4096)  # JSON may double the output
    received = 0
    pending = b""
    stdin_fd = stdin.fileno()
    os.set_blocking(stdin_fd, False)
    os.set_blocking(read_fd, False)
    to_send = memoryview(data)
    deadline = time.monotonic() + limits.timeout_s + _STARTUP_GRACE_S

    def take(chunk: bytes) -> bool:
        """Handle received report bytes; True once the run is over."""
        nonlocal received, pending, expected, deadline
        received += len(chunk)
        if received > budget:
            launch.abandoned = True
            return True
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            message = _authentic(line, nonce)
            if message is None:
                continue
            event, index = message["event"], message["index"]
            if event == "load_failed" and not launch.loaded:
                launch.load_detail = message["detail"]
                return True
            if event == "loaded":
                launch.loaded = True
            elif event == "test" and launch.loaded and index == expected:
                launch.results[index] = TestResult(message["status"], message["output"], message["detail"])
                expected += 1
            else:
                continue
            if expected == n:
                return True
            deadline = time.monotonic() + limits.timeout_s
        return False

    with selectors.DefaultSelector() as selector:
        selector.register(read_fd, selectors.EVENT_READ)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
        if status_fd is not None:
            selector.register(status_fd, selectors.EVENT_READ)
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0:
                launch.timed_out = launch.abandoned = True
                return launch
            for key, _ in selector.select(wait):
                if key.fd == stdin_fd:
                    try:
                        to_send = to_send[os.write(stdin_fd, to_send) :]
                    except BrokenPipeError:
                        to_send = to_send[:0]
                    if not to_send:
                        selector.unregister(stdin_fd)
                        if status_fd is None:  # a fresh harness reads its payload to EOF
                            stdin.close()
                    continue
                if key.fd == status_fd:  # the zygote's child has exited (or the zygote has): take what it wrote
                    launch.child_ended = True
                    launch.abandoned = not os.read(status_fd, 64)  # EOF: the zygote is gone
                    while chunk := _read_some(read_fd):
                        if take(chunk):
                            break
                    return launch
                chunk = _read_some(read_fd)
                if chunk is None:
                    continue
                if not chunk or take(chunk):
                    return launch


def _read_some(fd: int) -> bytes | None:
    """Up to 64 KiB from a non-blocking fd; b"" at EOF, None if nothing is there yet."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def _authentic(line: bytes, nonce: str) -> dict | None:
    """The decoded report if `line` is a well-formed report carrying `nonce`, else None."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("nonce") != nonce:
        return None
    fields = {"event": str, "index": int, "status": str, "output": str, "detail": str}
    if any(not isinstance(message.get(k), t) for k, t in fields.items()):
        return None
    return message


def _kill_group(proc: subprocess.Popen) -> None:
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


def _sandbox_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _process_limit(max_processes: int, use_bwrap: bool, uid: int | None) -> int:
    """RLIMIT_NPROC value giving the sandbox `max_processes` tasks of its own.

    The kernel counts tasks per user: a fresh uid (root case) or a fresh user namespace on
    Linux >= 5.14 (bwrap as non-root) starts at zero; otherwise the user's existing tasks count.
    """
    if uid is not None:
        return max_processes
    if use_bwrap and _kernel_version() >= _PER_USERNS_NPROC_KERNEL:
        return max_processes
    return _count_tasks_of(os.getuid()) + max_processes


def _kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _count_tasks_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _sandbox_uid() -> int | None:
    """The uid a sandbox started by this process runs as, or None to keep the caller's.

    Only root switches: to a uid of this process's own (unique among live processes), so
    concurrent sandboxes never share an RLIMIT_NPROC count, and the program can neither signal
    the caller nor write its files. (Without bwrap that uid may not be able to read the
    interpreter's files: the harness imports what it and the program's header need first.)
    """
    return _SANDBOX_UID_BASE + os.getpid() if os.geteuid() == 0 else None


@functools.cache
def _harness_code() -> bytes:
    """harness.py compiled once per process (marshal), for `_BOOTSTRAP` to run as `__main__`."""
    path = _harness_module.__file__
    with open(path, encoding="utf-8") as f:
        return marshal.dumps(compile(f.read(), path, "exec"))


@functools.cache
def _interpreter_path() -> list[str]:
    """The harness's sys.path: this interpreter's standard library and site-packages directories
    (what `site` would add), without the working directory or PYTHONPATH entries."""
    prefixes = tuple(os.path.realpath(p) + "/" for p in {sys.base_prefix, sys.prefix, sys.exec_prefix})
    return [p for p in sys.path if p and (os.path.realpath(p) + "/").startswith(prefixes)]


def _needed_paths() -> list[str]:
    """Paths the sandboxed interpreter must be able to read."""
    paths = {os.path.realpath(sys.executable), sys.base_prefix, sys.prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted({os.path.realpath(p) for p in paths})


@functools.cache
def _needs_masked_binds() -> bool:
    """Whether the interpreter's files lie under a directory the sandbox replaces with a tmpfs (/tmp, /run)."""
    return any(p.startswith(m + "/") for p in _needed_paths() for m in _BWRAP_MASKED)


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


def _bwrap_argv(tmp_bytes: int, drop_uid: bool) -> list[str]:
    """bubblewrap command prefix: read-only root, private /tmp and /run, no network, own PID namespace."""
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
    needed = _needed_paths()
    for masked in _BWRAP_MASKED:
        under = [p for p in needed if p.startswith(masked + "/")]
        args += _rebind(masked, under)
    needed = [p for p in needed if not any(p.startswith(m + "/") for m in _BWRAP_MASKED)]
    if drop_uid:
        # bwrap keeps root's capabilities unless told otherwise; the harness needs only these two
        # to switch to its own uid, after which it has none.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        for root, paths in _blocked_ancestors(needed).items():
            args += ["--perms", "0755", "--tmpfs", root] + _rebind(root, paths)
    else:
        args += ["--unshare-user"]
    return args
