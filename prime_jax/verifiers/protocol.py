"""What the host and the sandboxed harness exchange: a run's program, limits and payload going in, the
nonce-tagged reports coming back, and the host's end of that exchange (`collect`).

A separate module because both ways of running the harness use it unchanged: a fresh sandbox per run
(`sandbox._launch_fresh`) and the reused one (`zygote.launch`). `sandbox` re-exports `Program`, `Limits` and
`TestResult`, the types its callers see. Why a report can be trusted: see `sandbox`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import selectors
import time
from collections.abc import Sequence

MODES = ("stdio", "call", "assert")
STARTUP_GRACE_S = 2.0  # interpreter start-up, on top of the load deadline


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
class Launch:
    """What one sandbox launch reported."""

    results: dict[int, TestResult]
    loaded: bool = False
    load_detail: str = ""
    timed_out: bool = False
    abandoned: bool = False  # stopped waiting while the harness may still run (deadline, too much output)
    child_ended: bool = False  # a zygote said its child has exited and been cleaned up after


def payload(program: Program, start: int, limits: Limits, *, in_bwrap: bool, uid: int | None, nproc: int) -> dict:
    """What the harness needs for one run over tests[start:] (its `channel_fd` is set by the caller):
    a fresh random nonce, the program, and the limits it confines itself with (`nproc`: RLIMIT_NPROC)."""
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
        "in_bwrap": in_bwrap,
        "recursion_limit": limits.recursion_limit,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_s": math.ceil(limits.timeout_s * (remaining + 1) + STARTUP_GRACE_S),
            "nproc": nproc,
            "file_size_bytes": limits.file_size_bytes,
            "max_open_files": limits.max_open_files,
            "max_output_bytes": limits.max_output_bytes,
        },
    }


def collect(read_fd: int, stdin, data: bytes, payload: dict, n: int, limits: Limits, status_fd: int | None) -> Launch:
    """Send `data` on `stdin`, read nonce-tagged reports until every test reported, the harness
    ended (channel EOF, or a line on `status_fd` from a zygote), a deadline, or too much output."""
    launch = Launch(results={})
    nonce, start = payload["nonce"], payload["start"]
    expected = start
    budget = (n - start + 1) * (2 * limits.max_output_bytes + 4096)  # JSON may double the output
    received = 0
    pending = b""
    stdin_fd = stdin.fileno()
    os.set_blocking(stdin_fd, False)
    os.set_blocking(read_fd, False)
    to_send = memoryview(data)
    deadline = time.monotonic() + limits.timeout_s + STARTUP_GRACE_S

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
