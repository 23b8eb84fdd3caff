"""Hostile programs: each is contained, scores 0, and leaves the host (this process, its files,
its network, its process table) unaffected. Plus the harness's own protocol guarantees."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from prime_jax.verifiers import code, sandbox
from prime_jax.verifiers.pool import VerifierPool, VerifyItem
from prime_jax.verifiers.sandbox import Limits, Program, SandboxUnavailable, TestResult, run_tests

LIMITS = Limits(timeout_s=2.0)
REPO = Path(__file__).resolve().parents[2]


def score(program: str, asserts: list[str], prelude: str = "", allow_unsandboxed: bool = False) -> float:
    truth = {"prelude": prelude, "asserts": asserts}
    return code.score(f"```python\n{program}\n```", truth, LIMITS, allow_unsandboxed=allow_unsandboxed)


def _sandbox_processes(zombies: bool = False) -> list[int]:
    """Live (and with `zombies`, dead but not yet reaped) processes started by sandboxes of this process (harness,
    bwrap, anything they forked)."""
    uid = sandbox._SANDBOX_UID_BASE + os.getpid()
    harness = os.path.abspath(sandbox.__file__).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            status = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "Z" in fields["State"] and not zombies:
            continue
        ours = str(uid) in fields["Uid"].split() or (harness in cmdline and int(fields["PPid"]) == os.getpid())
        if ours:
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def host_unaffected():
    """Around every test: bwrap in use, and afterwards no sandbox process left, no process-table
    growth, and this process can still start programs."""
    assert sandbox.bwrap_available(), "these tests need a working bubblewrap"
    processes_before = len([e for e in os.scandir("/proc") if e.name.isdigit()])
    yield
    deadline = time.monotonic() + 5
    # Zombies too: until reaped they count against the sandbox uid's process limit in the next test.
    while _sandbox_processes(zombies=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []
    processes_after = len([e for e in os.scandir("/proc") if e.name.isdigit()])
    assert processes_after < processes_before + 50
    assert subprocess.run(["true"], check=False).returncode == 0


def timed(fn, *args):
    start = time.monotonic()
    value = fn(*args)
    return value, time.monotonic() - start


# ----------------------------------------------------------------------------- hostile programs


def test_infinite_loop() -> None:
    value, elapsed = timed(score, "def f():\n    while True:\n        pass", ["assert f() is None"])
    assert value == 0.0
    assert elapsed < LIMITS.timeout_s + 5


def test_sleeping_past_the_timeout() -> None:
    value, elapsed = timed(score, "import time\ndef f():\n    time.sleep(60)\n    return 1", ["assert f() == 1"])
    assert value == 0.0
    assert elapsed < LIMITS.timeout_s + 5


def test_fork_bomb() -> None:
    bomb = (
        "import os\n"
        "def f():\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    value, elapsed = timed(score, bomb, ["assert f()"])
    assert value == 0.0
    assert elapsed < LIMITS.timeout_s + 10


def test_thread_bomb() -> None:
    bomb = (
        "import threading, time\n"
        "threading.stack_size(32768)\n"
        "def f():\n"
        "    while True:\n"
        "        try:\n"
        "            threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "        except RuntimeError:\n"
        "            pass\n"
    )
    assert score(bomb, ["assert f()"]) == 0.0


@pytest.mark.parametrize(
    "bomb",
    [
        "x = bytearray(1 << 40)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 26))",
        "x = ' ' * (8 << 30)",
    ],
)
def test_memory_bomb(bomb: str) -> None:
    body = bomb.replace("\n", "\n    ")
    value, elapsed = timed(score, f"def f():\n    {body}\n    return 1", ["assert f() == 1"])
    assert value == 0.0
    assert elapsed < LIMITS.timeout_s + 10


def test_huge_output() -> None:
    """Unbounded stdout: the stdin/stdout test fails (file-size limit) and the host reads a bounded amount."""
    flood = "while True:\n    print('x' * 1000000)"
    tests = {"inputs": ["1\n"], "outputs": ["x"]}
    value, elapsed = timed(code.score, f"```python\n{flood}\n```", tests, LIMITS)
    assert value == 0.0
    assert elapsed < LIMITS.timeout_s + 5
    # One write 4x the file-size limit (16 MiB); a 1 GiB string took most of the 2 s budget to build on a loaded CI box.
    results = run_tests(Program("stdio", "import sys\nsys.stdout.write('y' * (64 << 20))", ["\n"]), LIMITS)
    assert results[0].status == "fail" and len(results[0].output) == 0


def test_writing_outside_the_temp_dir(tmp_path: Path) -> None:
    name = f"pwned_{secrets.token_hex(4)}"
    targets = [REPO / name, Path("/etc") / name, tmp_path / name]
    program = (
        "def f(paths):\n"
        "    for p in paths:\n"
        "        with open(p, 'w') as out:\n"
        "            out.write('pwned')\n"
        "    return True\n"
    )
    assert score(program, [f"assert f({[str(t)]!r})" for t in targets]) == 0.0
    assert not any(t.exists() for t in targets)


def test_private_temp_dir_is_writable_and_private() -> None:
    """Control for the test above: the sandbox's own /tmp works, and is not the host's /tmp."""
    marker = f"/tmp/prime_jax_marker_{secrets.token_hex(4)}"
    program = f"def f():\n    open({marker!r}, 'w').write('ok')\n    return open({marker!r}).read()"
    assert score(program, ["assert f() == 'ok'"]) == 1.0
    assert not Path(marker).exists()


def test_reading_then_deleting_files(tmp_path: Path) -> None:
    canaries = [tmp_path / "canary", Path("/var/tmp") / f"prime_jax_canary_{secrets.token_hex(4)}"]
    for canary in canaries:
        canary.write_text("keep me")
        canary.chmod(0o644)
    try:
        program = (
            "import os\n"
            "def f(path):\n"
            "    data = open(path).read()\n"
            "    os.remove(path)\n"
            "    return data\n"
        )
        assert score(program, [f"assert f({str(c)!r}) == 'keep me'" for c in canaries]) == 0.0
        assert all(c.read_text() == "keep me" for c in canaries)
    finally:
        canaries[1].unlink()


LEAVE_BEHIND = (
    "import os, time\n"
    "def f():\n"
    "    for d in [d for d in ('/tmp', '/dev/shm') if os.access(d, os.W_OK)]:\n"
    "        open(d + '/left', 'w').write('x')\n"
    "        os.makedirs(d + '/locked/in')\n"
    "        open(d + '/locked/in/file', 'w').write('x')\n"
    "        os.chmod(d + '/locked/in', 0o000)\n"
    "        os.chmod(d + '/locked', 0o500)\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    return True\n"
)
FIND_LEFTOVERS = (
    "import os\n"
    "def f():\n"
    "    files = [d + '/' + n for d in ('/tmp', '/dev/shm') for n in ('left', 'locked')\n"
    "             if os.path.lexists(d + '/' + n)]\n"
    "    mine = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())\n"
    "            and os.stat('/proc/' + p).st_uid == os.getuid()\n"
    "            and 'Z' not in open(f'/proc/{p}/stat').read().split()[2]]\n"
    "    return files, mine\n"
)


def test_a_run_leaves_nothing_to_the_next() -> None:
    """Files a run leaves in /tmp and /dev/shm (locked directories included) and processes it leaves running
    (in a session of their own) are gone when the next run starts, in the same reused sandbox."""
    assert score(LEAVE_BEHIND, ["assert f()"]) == 1.0
    results = run_tests(Program("call", FIND_LEFTOVERS, [[]], fn_name="f"), LIMITS)
    assert results[0].status == "output" and json.loads(results[0].output) == [[], []]


def test_network_connection_to_host_listener() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = (
        "import socket\n"
        "def f(port):\n"
        "    s = socket.create_connection(('127.0.0.1', port), timeout=1)\n"
        "    s.sendall(b'pwned')\n"
        "    return True\n"
    )
    try:
        assert score(program, [f"assert f({port})"]) == 0.0
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "kill, expected",
    [
        ("os.kill(os.getppid(), signal.SIGKILL)", 0.0),
        # From a zygote's child it reaches no process it may signal (kill spares the caller): the asserts pass.
        ("os.kill(-1, signal.SIGKILL)", 1.0),
        ("os.killpg(0, signal.SIGKILL)", 0.0),
    ],
)
def test_killing_the_parent(kill: str, expected: float) -> None:
    program = f"import os, signal\ndef f():\n    {kill}\n    return True"
    assert score(program, ["assert f()", "assert f()"]) == expected
    # this process is alive and the next verification works normally
    assert score("def f():\n    return True", ["assert f()"]) == 1.0


@pytest.mark.parametrize("escape", ["sys.exit(0)", "os._exit(0)", "raise SystemExit(0)"])
def test_exit_before_the_asserts(escape: str) -> None:
    """A wrong answer that exits (with status 0) before, or instead of, the asserts."""
    assert score(f"import os, sys\ndef f(x):\n    return 0\n{escape}", ["assert f(1) == 2"]) == 0.0
    assert score(f"import os, sys\ndef f(x):\n    {escape}", ["assert f(1) == 2"]) == 0.0


@pytest.mark.parametrize(
    "patch",
    [
        "import builtins\nbuiltins.set = lambda *args: 0",
        "__builtins__['set'] = lambda *args: 0",
        "import builtins\nbuiltins.len = lambda *args: 2\nbuiltins.set = lambda *args: {1}",
    ],
)
def test_monkeypatching_builtins_to_fake_the_asserts(patch: str) -> None:
    """A wrong function plus builtins patched so that the tests' own expressions would agree."""
    wrong = "def f():\n    return [3]\n"
    asserts = ["assert set(f()) == set([1, 2])", "assert len(set(f())) == 2"]
    assert score(wrong + patch, asserts) == 0.0
    assert score("def f():\n    return [1, 2]\n" + patch, asserts) == 1.0  # control: the real answer passes


def test_forged_report_lines() -> None:
    """Printing pass reports, with any nonce, on stdout, stderr and every other fd does not count."""
    forged = (
        "import json, os\n"
        "for nonce in ['0' * 32, '']:\n"
        "    for fd in range(0, 64):\n"
        "        for event in ('loaded', 'test'):\n"
        "            line = json.dumps({'nonce': nonce, 'event': event, 'index': 0, 'status': 'pass',"
        " 'output': '', 'detail': ''}) + '\\n'\n"
        "            try:\n"
        "                os.write(fd, line.encode())\n"
        "            except OSError:\n"
        "                pass\n"
        "print('PASS')\n"
        "os._exit(0)\n"
    )
    assert score(forged, ["assert False"]) == 0.0


# ----------------------------------------------------------------------------- protocol


def test_results_in_order_and_statuses() -> None:
    program = Program(
        "assert",
        "import os\n"
        "def f(x):\n"
        "    if x == 3:\n"
        "        os._exit(1)\n"
        "    while x == 5:\n"
        "        pass\n"
        "    return x\n",
        ["assert f(1) == 1", "assert f(2) == 0", "f(3)", "assert f(4) == 4", "f(5)", "assert f(6) == 6"],
    )
    statuses = [r.status for r in run_tests(program, Limits(timeout_s=1.0))]
    assert statuses == ["pass", "fail", "crash", "pass", "timeout", "pass"]


def test_load_failure_fails_every_test() -> None:
    results = run_tests(Program("assert", "raise ValueError('boom')", ["assert True", "assert True"]), LIMITS)
    assert [r.status for r in results] == ["fail", "fail"]
    assert "boom" in results[0].detail


def test_tests_see_pristine_builtins() -> None:
    """Patches of the builtins module reach neither namespace; patches of the candidate's own
    `__builtins__` stay in the candidate's namespace."""
    candidate = (
        "__builtins__['abs'] = lambda x: 42\n"
        "import builtins\n"
        "builtins.round = lambda *args: 7\n"
        "def g():\n"
        "    return abs(-1), round(1.2)\n"
    )
    tests = ["assert abs(-1) == 1 and round(1.2) == 1", "assert g() == (42, 1)"]
    assert [r.status for r in run_tests(Program("assert", candidate, tests), LIMITS)] == ["pass", "pass"]


def test_rlimits_and_uid_inside_the_sandbox() -> None:
    """The harness runs the program under the configured limits, as an unprivileged uid, without
    capabilities, network or the host's /tmp."""
    probe = (
        "import os, resource, socket\n"
        "def info():\n"
        "    caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
        "    return dict(uid=os.getuid(), caps=caps, as_=resource.getrlimit(resource.RLIMIT_AS)[0],\n"
        "        nproc=resource.getrlimit(resource.RLIMIT_NPROC)[0],\n"
        "        fsize=resource.getrlimit(resource.RLIMIT_FSIZE)[0],\n"
        "        ifaces=sorted(n for _, n in socket.if_nameindex()), pid1=open('/proc/1/cmdline').read()[:5])\n"
    )
    limits = Limits(timeout_s=5.0, memory_bytes=1 << 30, max_processes=16, file_size_bytes=1 << 20)
    results = run_tests(Program("call", probe, [[]], fn_name="info"), limits)
    info = json.loads(results[0].output)
    assert info["uid"] != 0 and info["caps"] == "0000000000000000"
    assert (info["as_"], info["nproc"], info["fsize"]) == (1 << 30, 16, 1 << 20)
    assert info["ifaces"] == ["lo"]
    assert info["pid1"] == "bwrap"


# ----------------------------------------------------------------------------- without bubblewrap

KILL_PARENT = [f"import os, signal\ndef f():\n    {kill}\n    return True" for kill in (
    "os.kill(os.getppid(), signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)", "os.killpg(0, signal.SIGKILL)")]
FORK_BOMB = (
    "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
)
DELETE = "import os\ndef f(paths):\n    for p in paths:\n        os.remove(p)\n    return True\n"


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """PATH without bwrap, and the sandbox probed afresh (again after the test)."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sandbox.sandbox_problem.cache_clear()
    yield
    sandbox.sandbox_problem.cache_clear()


@pytest.fixture
def canaries(tmp_path: Path) -> list[Path]:
    """Files outside any temp dir of a sandbox: one in a private directory, one in /var/tmp (world-readable)."""
    files = [tmp_path / "canary", Path("/var/tmp") / f"prime_jax_canary_{secrets.token_hex(4)}"]
    for file in files:
        file.write_text("keep me")
        file.chmod(0o644)
    yield files
    files[1].unlink(missing_ok=True)


@pytest.mark.usefixtures("no_bwrap")
def test_without_bwrap_nothing_runs(canaries: list[Path]) -> None:
    """Fails closed: no program runs, so none can kill this process, fork-bomb it or delete its files."""
    assert not sandbox.bwrap_available()
    for program, asserts in [(p, ["assert f()"]) for p in KILL_PARENT] + [
        (FORK_BOMB, ["assert f()"]), (DELETE, [f"assert f({[str(c) for c in canaries]!r})"]),
        ("def f():\n    return True", ["assert f()"]),  # a correct program does not run either
    ]:
        with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
            score(program, asserts)
    assert all(c.read_text() == "keep me" for c in canaries)


def test_without_bwrap_the_pool_scores_code_0_and_counts_it(caplog: pytest.LogCaptureFixture,
                                                            request: pytest.FixtureRequest) -> None:
    """One start-up error line naming the install command; code items 0 and counted; math still scored.
    Control first: with bubblewrap the same items score 1 (this also starts the pool's forkserver with
    the real PATH: the pool's own probe, not the workers', decides)."""
    correct = VerifyItem("```python\ndef f():\n    return True\n```", "code", json.dumps({"asserts": ["assert f()"]}))
    math_item = VerifyItem("So \\boxed{4}.", "math", "4")
    with VerifierPool(1, item_timeout_s=60.0, batch_timeout_s=120.0) as pool:
        assert pool.score_batch([correct, math_item]).scores.tolist() == [1.0, 1.0]
    request.getfixturevalue("no_bwrap")
    with caplog.at_level("ERROR"), VerifierPool(1, item_timeout_s=60.0, batch_timeout_s=120.0) as pool:
        result = pool.score_batch([correct, math_item, correct])
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "sudo apt-get install -y bubblewrap" in lines[0] and "verifier/unsandboxed" in lines[0]
    assert result.scores.tolist() == [0.0, 1.0, 0.0]
    assert result.counts["unsandboxed"] == 2 and result.counts["errors"] == 0


@pytest.mark.usefixtures("no_bwrap")
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid of its own needs root; a non-root caller's uid is kept")
@pytest.mark.parametrize("program, expected", list(zip(KILL_PARENT + [FORK_BOMB, DELETE], [0.0, 1.0, 0.0, 0.0, 0.0])),
                         ids=["getppid", "all", "group", "fork", "rm"])
def test_without_bwrap_opted_in_root_runs_code_as_its_own_uid(program: str, expected: float,
                                                               canaries: list[Path]) -> None:
    """verifier.allow_unsandboxed as root: the program runs under a uid that cannot signal this
    process or delete its files, with the process limit enforced. (`kill(-1)` succeeds: the only
    process it may signal is itself, which `kill(-1)` spares.)"""
    value, elapsed = timed(score, program, [f"assert f({[str(c) for c in canaries]!r})" if "paths" in program
                                             else "assert f()"], "", True)
    assert value == expected
    assert elapsed < LIMITS.timeout_s + 10
    assert all(c.read_text() == "keep me" for c in canaries)
    probe = "import os\ndef f():\n    return os.getuid()"
    assert score(probe, [f"assert f() == {sandbox._SANDBOX_UID_BASE + os.getpid()}"], "", True) == 1.0


@pytest.mark.usefixtures("no_bwrap")
def test_without_bwrap_opted_in_rlimits_still_apply() -> None:
    """The opted-in fallback runs the same protocol with rlimits only."""
    tests = ["assert f(2) == 4", "assert f(2) == 5", "x = bytearray(1 << 40)"]
    program = Program("assert", "def f(x):\n    return x * 2", tests)
    assert [r.status for r in run_tests(program, LIMITS, allow_unsandboxed=True)] == ["pass", "fail", "fail"]
    assert run_tests(Program("stdio", "print(int(input()) + 1)", ["41"]), LIMITS, allow_unsandboxed=True) == [
        TestResult("output", "42\n")]
