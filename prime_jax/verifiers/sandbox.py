"""Run untrusted Python code against tests in an isolated process, with results it cannot forge: the host side.

`run_tests` runs the harness (harness.py, compiled once) under bubblewrap (`bwrap.command`: no network,
read-only root, private size-capped /tmp, own PID namespace, dies with its parent, new session); sends the
program, the tests and a random per-run nonce to it; reads per-test reports from a pipe (`protocol.collect`);
gives every test a wall-clock deadline; and after a crash continues at the next test in a fresh process. The
harness starts as `python -I -S` with the host's exact interpreter path (no `site` import, nothing from `.pth`
files or the environment). Each calling process keeps one such sandbox waiting (`zygote`: a run is a fork of
it, cleaned up after), wherever the interpreter lives (/tmp included); `reuse_sandbox=False` starts a fresh
sandbox per run instead. Modules: this one (the API and the fresh-sandbox launch), `protocol` (what goes in and
comes back), `bwrap` (the command and what the sandbox sees), `zygote` (the reused sandbox), `harness` (inside).

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
import functools
import json
import os
import platform
import shutil
import subprocess
import tempfile

from prime_jax.verifiers import bwrap, zygote
from prime_jax.verifiers.protocol import MODES, Launch, Limits, Program, TestResult, collect, payload

__all__ = ["BWRAP_INSTALL", "MODES", "Limits", "Program", "SandboxUnavailable", "TestResult", "bwrap_available",
           "run_tests", "sandbox_problem"]

BWRAP_INSTALL = "sudo apt-get install -y bubblewrap"
# Tasks a user may own count against RLIMIT_NPROC per user namespace from Linux 5.14 on.
_PER_USERNS_NPROC_KERNEL = (5, 14)
# Root drops each sandbox to uid/gid = base + caller pid, so concurrent sandboxes never share
# an RLIMIT_NPROC count (the kernel ignores that limit for root itself).
_SANDBOX_UID_BASE = 200_000


class SandboxUnavailable(RuntimeError):
    """No working bubblewrap here and running without it was not allowed: nothing was run."""


def run_tests(program: Program, limits: Limits = Limits(), *, allow_unsandboxed: bool = False,
              reuse_sandbox: bool = True) -> list[TestResult]:
    """Run every test of `program` in order; one TestResult per test.

    With bubblewrap, runs fork from this process's waiting sandbox (a zygote), which kills what a
    run left behind and empties its temp dirs before the next; `reuse_sandbox=False` starts a fresh
    sandbox and interpreter instead (slower; bench/verifiers.py compares the two).

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
        launch = _launch(program, start, limits, use_bwrap, reuse_sandbox)
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


def _launch(program: Program, start: int, limits: Limits, use_bwrap: bool, reuse: bool) -> Launch:
    """One sandboxed harness run over tests[start:]: in this process's reusable sandbox when
    `reuse` (and bubblewrap, and no other thread of this process is using it), else in a fresh one."""
    uid = _sandbox_uid()
    nproc = _process_limit(limits.max_processes, use_bwrap, uid)
    run = payload(program, start, limits, in_bwrap=use_bwrap, uid=uid, nproc=nproc)
    if use_bwrap and reuse and zygote.LOCK.acquire(blocking=False):
        try:
            return zygote.launch(run, len(program.tests), limits, uid)
        finally:
            zygote.LOCK.release()
    return _launch_fresh(run, len(program.tests), limits, use_bwrap, uid)


def _launch_fresh(run: dict, n: int, limits: Limits, use_bwrap: bool, uid: int | None) -> Launch:
    """A new sandbox (interpreter start-up included) for this run alone, killed at its end."""
    read_fd, write_fd = os.pipe()
    run["channel_fd"] = write_fd
    code = bwrap.harness_code()
    with contextlib.ExitStack() as cleanup:
        if use_bwrap:
            argv, cwd = bwrap.command(limits.tmp_bytes, uid is not None) + bwrap.harness_argv(code), "/"
        else:  # a private working directory at least
            cwd = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="prime_jax_sandbox_"))
            argv = bwrap.harness_argv(code)
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
                env=bwrap.sandbox_env("/tmp" if use_bwrap else cwd),
            )
        finally:
            os.close(write_fd)
        try:
            stdin = code + json.dumps(run).encode()
            return collect(read_fd, proc.stdin, stdin, run, n, limits, status_fd=None)
        finally:
            bwrap.kill_group(proc)
            os.close(read_fd)


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
