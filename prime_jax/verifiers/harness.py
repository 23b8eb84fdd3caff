"""The in-sandbox half of `sandbox.run_tests`: runs untrusted code against tests, reports each outcome.

The host (sandbox.py, bwrap.py) compiles this file once and starts it, under bubblewrap, as `__main__` of a
fresh interpreter (`python -I -S`: no `site`, the host's exact sys.path). It reads the payload on
stdin, confines itself (when started as root it drops to an unprivileged uid of its own; rlimits on
CPU, address space, processes, file size; parent-death signal; no new privileges), then loads the
candidate, runs the tests, and reports each outcome, tagged with the per-run nonce, on the channel fd.
Only the standard library is imported here, and only before the candidate runs: after that the
harness uses references it bound beforehand (see sandbox.py for why the reports can be trusted).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import resource
import shutil
import signal
import sys
import threading


def _confine(limits: dict, uid: int | None, in_bwrap: bool) -> None:
    """Drop privileges and set resource limits on the harness process itself (still trusted)."""
    if not in_bwrap:  # imported while the interpreter's files are still readable (before the uid switch)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if not in_bwrap:  # bwrap already gives both; set after the uid switch, which clears the first
        pr_set_pdeathsig, pr_set_no_new_privs = 1, 38
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    for name, soft, hard in (
        ("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_s"], limits["cpu_s"] + 1),
        ("RLIMIT_NPROC", limits["nproc"], limits["nproc"]),
        ("RLIMIT_FSIZE", limits["file_size_bytes"], limits["file_size_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"], limits["max_open_files"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        kind = getattr(resource, name)
        current_hard = resource.getrlimit(kind)[1]
        if current_hard != resource.RLIM_INFINITY:  # limits can only go down
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead


def _make_reporter(fd: int, nonce: str):
    """A function writing one nonce-tagged JSON line per event to `fd` (bound before the candidate runs)."""
    write, dumps, view_of = os.write, json.dumps, memoryview

    def report(event: str, index: int = -1, status: str = "", output: str = "", detail: str = "") -> None:
        line = dumps(
            {"nonce": nonce, "event": event, "index": index, "status": status, "output": output, "detail": detail}
        )
        view = view_of((line + "\n").encode())
        while view:
            view = view[write(fd, view) :]

    return report


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("stdin", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_stdio(payload: dict, report, pristine: dict) -> None:
    """Each test runs the whole program as `__main__` with the test input on fd 0; reports stdout."""
    inputs, max_output = payload["input_fds"], payload["limits"]["max_output_bytes"]
    header = compile(payload["header"], "<header>", "exec")
    code = compile(payload["source"], "<candidate>", "exec")  # a SyntaxError is a load failure
    dup2, memfd, lseek, read, close = os.dup2, os.memfd_create, os.lseek, os.read, os.close
    run, fresh, open_fd, sys_mod = exec, dict, io.open, sys
    enumerate_threads, main_thread = threading.enumerate, threading.main_thread()
    base_exc, exit_exc = BaseException, SystemExit
    report("loaded")
    for index, in_fd in inputs:
        dup2(in_fd, 0)
        out_fd = memfd("stdout", 0)
        dup2(out_fd, 1)
        stdout = open_fd(1, "w", encoding="utf-8", closefd=False)
        sys_mod.stdin = open_fd(0, "r", encoding="utf-8", errors="replace", closefd=False)
        sys_mod.stdout = stdout
        namespace = {"__name__": "__main__", "__builtins__": fresh(pristine)}
        status, detail = "output", ""
        try:
            run(header, namespace)
            run(code, namespace)
        except exit_exc:
            pass
        except base_exc as exc:
            status, detail = "fail", _describe(exc)
        for thread in enumerate_threads():
            if thread is not main_thread:
                thread.join()
        try:
            stdout.flush()
        except base_exc as exc:
            status, detail = "fail", _describe(exc)
        lseek(out_fd, 0, 0)
        data = read(out_fd, max_output + 1)
        close(out_fd)
        if len(data) > max_output:
            status, detail, data = "fail", "output too large", b""
        report("test", index, status, data.decode("utf-8", "replace"), detail)


def _load_candidate(payload: dict, pristine: dict) -> dict:
    """Run header + candidate in a namespace of their own; returns it (raises on failure)."""
    namespace = {"__name__": "__candidate__", "__builtins__": dict(pristine)}
    exec(compile(payload["header"], "<header>", "exec"), namespace)
    exec(compile(payload["source"], "<candidate>", "exec"), namespace)
    return namespace


def _run_call(payload: dict, report, pristine: dict) -> None:
    """Calls `fn_name` (a function, or a method of a fresh `Solution()`) per test; reports JSON of the result."""
    name, max_output = payload["fn_name"], payload["limits"]["max_output_bytes"]
    tests = [(i, payload["tests"][i]) for i in range(payload["start"], len(payload["tests"]))]
    dumps, base_exc, as_text = json.dumps, BaseException, repr
    namespace = _load_candidate(payload, pristine)
    solution = namespace.get("Solution")
    if isinstance(solution, type) and hasattr(solution, name):

        def target(*args):  # a fresh instance per test, as LeetCode does
            return getattr(solution(), name)(*args)

    elif callable(namespace.get(name)):
        target = namespace[name]
    else:
        raise NameError(f"the program defines no function or Solution method {name!r}")
    report("loaded")
    for index, args in tests:
        try:
            output, status, detail = dumps(target(*args), default=as_text), "output", ""
        except base_exc as exc:
            output, status, detail = "", "fail", _describe(exc)
        if len(output) > max_output:
            output, status, detail = "", "fail", "output too large"
        report("test", index, status, output, detail)


def _run_assert(payload: dict, report, pristine: dict) -> None:
    """Runs the prelude after the candidate, then each test statement; a test passes if it raises nothing."""
    indices = range(payload["start"], len(payload["tests"]))
    tests = [(i, compile(payload["tests"][i], f"<test {i}>", "exec")) for i in indices]
    prelude = compile(payload["prelude"], "<prelude>", "exec")
    run, fresh, base_exc = exec, dict, BaseException
    settrace, setprofile = sys.settrace, sys.setprofile
    candidate = _load_candidate(payload, pristine)
    namespace = fresh(candidate)
    namespace["__builtins__"] = fresh(pristine)
    run(prelude, namespace)
    report("loaded")
    for index, test in tests:
        settrace(None)
        setprofile(None)
        try:
            run(test, namespace)
            status, detail = "pass", ""
        except base_exc as exc:
            status, detail = "fail", _describe(exc)
        report("test", index, status, "", detail)


def _harness_main(payload: dict) -> None:
    """One run inside the sandbox: reports on the channel fd, then exits the process."""
    pristine = dict(builtins.__dict__)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # also closes a zygote's control and status pipes to the program
        os.dup2(devnull, fd)
    report = _make_reporter(payload.pop("channel_fd"), payload.pop("nonce"))  # only the closure keeps them
    runner = {"stdio": _run_stdio, "call": _run_call, "assert": _run_assert}[payload["mode"]]
    if payload["mode"] == "stdio":  # written before RLIMIT_FSIZE applies
        tests = payload["tests"]
        payload["input_fds"] = [(i, _memfd_with(tests[i].encode())) for i in range(payload["start"], len(tests))]
    _import_header(payload["header"])
    _confine(payload["limits"], payload["uid"], payload["in_bwrap"])
    sys.setrecursionlimit(payload["recursion_limit"])
    try:
        runner(payload, report, pristine)
    except BaseException as exc:  # the program (or its prelude) failed to load
        report("load_failed", detail=_describe(exc))
    os._exit(0)


def _import_header(header: str) -> None:
    """The header's imports, done while still privileged (without bwrap the sandbox uid may not be
    able to read the interpreter's files, e.g. a Python under /root) or, in a zygote, once for all."""
    exec(compile(header, "<header>", "exec"), {"__builtins__": dict(builtins.__dict__)})


def _remove_tree(path: str) -> None:
    """rmtree of a directory the run made, after giving its owner (us, now) write and search rights on every
    directory in it: a run may lock them (chmod 0) to leave files to the next run."""
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            os.chmod(directory, 0o700)
            stack += [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _scheduling() -> tuple:
    """This process's scheduling (policy, priority, nice, CPUs): what Linux's setpriority and sched_setaffinity
    permission checks may let a process whose effective uid equals ours change, where signals, ptrace and
    rlimits check our real and saved uids. (Linux 6.18 here refuses even that: checked, not relied on.)"""
    return (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority, os.getpriority(os.PRIO_PROCESS, 0),
            os.sched_getaffinity(0))


def _reap(uid: int | None, undumpable) -> None:
    """After a run in a zygote: SIGKILL every process the run left and empty /tmp and /dev/shm, with the
    run's own permissions. A root zygote (bwrap leaves it no CAP_KILL) takes the run's uid as its effective
    uid for the while: root stays its real and saved uid, so the run's processes can neither signal nor
    ptrace it, and it can switch back. Saves forking a helper of that uid per run. While the uids are
    equal, a leftover could change our scheduling: the caller checks `_scheduling` afterwards.
    `undumpable()`: a change of effective uid resets dumpable to fs.suid_dumpable; called after each."""
    if uid is not None:
        os.setresgid(-1, uid, -1)
        os.setresuid(-1, uid, -1)
        undumpable()
    try:
        try:  # every process this uid may signal but the zygote (and the PID namespace's init, bwrap)
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for directory in ("/tmp", "/dev/shm"):
            for entry in os.scandir(directory) if os.path.isdir(directory) else ():
                try:
                    if entry.stat(follow_symlinks=False).st_dev != os.stat(directory).st_dev:
                        continue  # a read-only mount of the interpreter's files (`bwrap.command`): not the program's
                except OSError:  # removed meanwhile by a process finishing its last call
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(entry.path)
                else:
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass
    finally:
        if uid is not None:
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
            undumpable()


def _zygote_main() -> None:
    """Sandbox entry of a reusable sandbox (bubblewrap only): for each payload frame on stdin
    (`<length>\\n<json>`), fork a child that runs it (`_harness_main`); once it has exited, kill
    every process it left and empty the temp dirs, then write `done\\n` on stdout. Children close
    stdin and stdout first, so no program sees the next payload or can fake `done`."""
    import ctypes

    # Not dumpable: a child of the same uid (bwrap without root) can then neither ptrace this
    # process nor open its /proc fds and memory; it can at most kill it, which ends the sandbox.
    pr_set_dumpable = 4
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    undumpable = lambda: prctl(pr_set_dumpable, 0, 0, 0, 0)  # noqa: E731
    undumpable()
    if os.geteuid() == 0:  # the runs' uid takes no supplementary group of ours while reaping (`_reap`)
        os.setgroups([])
    scheduling = _scheduling()
    read_line, read, write = sys.stdin.buffer.readline, sys.stdin.buffer.read, os.write
    imported = None
    while True:
        size = read_line()
        if not size:
            os._exit(0)
        payload = json.loads(read(int(size)))
        if payload["header"] != imported:  # imports are idempotent: the same header once
            _import_header(payload["header"])
            imported = payload["header"]
        child = os.fork()
        if child == 0:
            _harness_main(payload)
        os.waitpid(child, 0)
        _reap(payload["uid"], undumpable)
        if _scheduling() != scheduling:  # a leftover changed it while we reaped as its uid: this sandbox ends here
            os._exit(1)
        write(1, b"done\n")


if __name__ == "__main__":
    import _sitebuiltins  # `exit` and `quit`, which `site` (not imported: `python -S`) would add

    builtins.exit, builtins.quit = (_sitebuiltins.Quitter(name, "Ctrl-D (i.e. EOF)") for name in ("exit", "quit"))
    if sys.argv[2:] == ["zygote"]:
        _zygote_main()
    else:
        _harness_main(json.loads(sys.stdin.buffer.read()))
