"""The reused sandbox (the "zygote"): one bubblewrap sandbox per calling process whose harness waits for
payloads and forks one child per run, so a run pays neither a sandbox nor an interpreter start-up.

Why: a fresh sandbox and interpreter per code item costs several times the item itself (bench/verifiers.py
prints both). The zygote imports the program header's modules once; after each run's child has exited it kills
every process the run left and empties /tmp and /dev/shm (`harness._zygote_main`, `harness._reap`), then says
`done` on its stdout. A run that times out or floods the channel takes the whole sandbox down, and the next run
starts a new one. One thread of a process uses it at a time (`LOCK`); `sandbox._launch` runs the others in fresh
sandboxes. Runs in one zygote share its IPC namespace and its interpreter's state as of the fork.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import threading

from prime_jax.verifiers import bwrap
from prime_jax.verifiers.protocol import STARTUP_GRACE_S, Launch, Limits, collect


@dataclasses.dataclass
class Zygote:
    """A bubblewrap sandbox whose harness waits for payloads and forks one child per run
    (`harness._zygote_main`)."""

    proc: subprocess.Popen
    channel: int  # read end of the report pipe its children share (nonce-tagged reports)
    channel_fd: int  # the write end's number inside the sandbox
    key: tuple  # (tmp_bytes, uid) it was started with
    owner: int  # the pid of the process that started it (a forked copy of this module starts its own)
    idle: bool = True  # no child running or being cleaned up after


_zygote: Zygote | None = None
LOCK = threading.Lock()  # held by the thread running in this process's zygote


def current() -> Zygote | None:
    """This process's zygote, if it has one running."""
    return _zygote if _zygote is not None and _zygote.owner == os.getpid() else None


def launch(payload: dict, n: int, limits: Limits, uid: int | None) -> Launch:
    """The run in this process's zygote (started, or restarted, as needed); the caller holds `LOCK`.
    A timed-out or flooding run takes its zygote down with it; the next run starts a fresh one."""
    global _zygote
    key = (limits.tmp_bytes, uid)
    zygote = current()
    if zygote is not None and (zygote.key != key or not _await_idle(zygote, limits.timeout_s + STARTUP_GRACE_S)):
        _stop(zygote)
        zygote = None
    if zygote is None:
        zygote = _zygote = _start(key)
    payload["channel_fd"] = zygote.channel_fd
    body = json.dumps(payload).encode()
    zygote.idle = False
    try:
        result = collect(zygote.channel, zygote.proc.stdin, b"%d\n" % len(body) + body, payload, n, limits,
                         status_fd=zygote.proc.stdout.fileno())
    except BaseException:
        _stop(zygote)
        raise
    if result.child_ended:
        zygote.idle = True
    if result.abandoned or zygote.proc.poll() is not None:
        _stop(zygote)
    return result


def _start(key: tuple) -> Zygote:
    tmp_bytes, uid = key
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    code = bwrap.harness_code()
    try:
        proc = subprocess.Popen(
            bwrap.command(tmp_bytes, uid is not None) + bwrap.harness_argv(code, "zygote"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
            env=bwrap.sandbox_env("/tmp"),
        )
    finally:
        os.close(write_fd)
    proc.stdin.write(code)
    proc.stdin.flush()
    return Zygote(proc, read_fd, write_fd, key, os.getpid())


def _await_idle(zygote: Zygote, timeout_s: float) -> bool:
    """Whether the zygote has finished cleaning up after its last child (waits up to `timeout_s`)."""
    if zygote.idle:
        return True
    status = zygote.proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(status, selectors.EVENT_READ)
        if selector.select(timeout_s) and os.read(status, 64):
            zygote.idle = True
    return zygote.idle


def _stop(zygote: Zygote) -> None:
    global _zygote
    bwrap.kill_group(zygote.proc)
    zygote.proc.stdout.close()
    os.close(zygote.channel)
    if _zygote is zygote:
        _zygote = None
