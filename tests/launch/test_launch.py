"""launch/tpu.sh and launch/gpu.sh end to end against fake gcloud / ssh / scp on PATH.

The fakes (tests/launch/fake_tools.py) record every call and act as the remote hosts, so
these tests check both the command sequence and what the remote snippets really do on a
host: unpack git HEAD, install with the right extra, start main with the right argv and
environment, write the log and pid file, refuse a second start, stop on SIGTERM.
"""
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import fake_tools

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
GPU = LAUNCH / "gpu.sh"
# An override that must reach main verbatim through two shells: quotes, spaces and a '$'.
TRICKY = """--config.note=it's "quoted" $HOME"""


@dataclass
class Fake:
    tmp: Path
    state: Path
    env: dict

    def run(self, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args], cwd=self.tmp, env={**self.env, **env},
            capture_output=True, text=True, timeout=60,
        )

    def calls(self, tool: str) -> list[dict]:
        return [c for c in fake_tools.read_calls(self.state) if c["tool"] == tool]

    def mains(self, count: int) -> list[dict]:
        """Records of fake `python -m prime_jax.main`; waits for `count` (they start in the background)."""
        deadline = time.monotonic() + 20
        while True:
            mains = [c for c in self.calls("python") if c["argv"][:2] == ["-m", "prime_jax.main"]]
            if len(mains) >= count or time.monotonic() > deadline:
                return mains
            time.sleep(0.05)

    def host(self, name: str) -> Path:
        return self.state / "hosts" / name


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    for tool in ("gcloud", "ssh", "scp"):
        fake_tools.install(bin_dir, tool)
    fake_tools.install(state / "hostbin", "uv")
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIME_", "FAKE_"))}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_STATE=str(state), TMPDIR=str(tmp_path / "tmp"),
        JAX_PLATFORMS="cpu",  # set locally; the launchers must not pass it on to main
    )
    return Fake(tmp_path, state, env)


def git_head_file(path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{path}"],
                          capture_output=True, text=True, check=True).stdout


def gcloud_verb(call: dict) -> str:
    """'queued-resources create', 'tpu-vm ssh', ... of a recorded gcloud call."""
    return " ".join(call["argv"][2:4])


def shown_commands(stdout: str) -> list[list[str]]:
    """The commands a --dry-run printed ('+ cmd ...' lines), split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_up_then_delete_runs_the_whole_sequence_on_every_worker(fake: Fake):
    up = fake.run(TPU, "--name", "prime-test", "--project", "test-proj", "--poll-interval", "0",
                  "--config=configs/tiny.py", "--workdir", "gs://bucket/run 1",
                  "--env", "WANDB_MODE=offline", "up", "--", "--config.rl.lr=1e-6", TRICKY,
                  FAKE_QR_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE", FAKE_TPU_WORKERS="2")
    assert up.returncode == 0, up.stderr
    down = fake.run(TPU, "--name", "prime-test", "--project", "test-proj", "delete")
    assert down.returncode == 0, down.stderr

    gcloud = fake.calls("gcloud")
    assert [gcloud_verb(c) for c in gcloud] == [
        "queued-resources create",
        "queued-resources describe", "queued-resources describe", "queued-resources describe",
        "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh",
        "queued-resources delete",
    ]
    create = gcloud[0]["argv"]
    assert create[4] == "prime-test"
    for flag in ("--node-id=prime-test", "--zone=us-east5-a", "--project=test-proj",
                 "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5", "--spot"):
        assert flag in create
    assert "--reserved" not in create
    for call in gcloud[1:]:
        assert "--zone=us-east5-a" in call["argv"] and "--project=test-proj" in call["argv"]
    assert all("--worker=all" in c["argv"] for c in gcloud[4:9])
    assert "apt-get install -y -qq bubblewrap" in gcloud[6]["argv"][-1]  # install: the sandbox first
    delete = gcloud[-1]["argv"]
    assert delete[4] == "prime-test" and {"--force", "--async", "--quiet"} <= set(delete)

    workers = [fake.host("worker0"), fake.host("worker1")]
    installs = [c for c in fake.calls("python") if c["argv"][:2] == ["-m", "pip"]]
    assert sorted(c["cwd"] for c in installs) == [str(w / "prime_jax" / "src") for w in workers]
    assert all(c["argv"] == ["-m", "pip", "install", "-r", "requirements.txt", ".[tpu]"] for c in installs)

    mains = fake.mains(2)
    assert sorted(c["cwd"] for c in mains) == [str(w / "prime_jax" / "src") for w in workers]
    calls = fake_tools.read_calls(fake.state)
    preflights = [i for i, c in enumerate(calls) if c["argv"][:2] == ["-m", "prime_jax.preflight"]]
    assert len(preflights) == 2 and max(preflights) < min(calls.index(m) for m in mains)  # every worker, before main
    assert all(calls[i]["argv"][2:] == mains[0]["argv"][2:] for i in preflights)  # with main's arguments
    for main in mains:
        assert main["argv"] == ["-m", "prime_jax.main", "--config=configs/tiny.py",
                                "--config.workdir=gs://bucket/run 1", "--config.distributed=True",
                                "--config.rl.lr=1e-6", TRICKY]
        assert main["env"]["JAX_PLATFORMS"] is None
        assert main["env"]["PYTHONUNBUFFERED"] == "1" and main["env"]["WANDB_MODE"] == "offline"
    for worker in workers:
        src = worker / "prime_jax" / "src"
        assert (src / "requirements.txt").read_text() == git_head_file("requirements.txt")
        assert not (worker / "prime_jax-src.tar.gz").exists()
        log = worker / "prime_jax" / "logs" / "latest.log"
        assert log.is_symlink() and "fake prime_jax.main --config=configs/tiny.py" in log.read_text()
        assert (worker / "prime_jax" / "logs" / "main.pid").read_text().strip().isdigit()
    assert list((fake.tmp / "tmp").iterdir()) == []  # local tarball removed


def test_tpu_failed_queued_resource_exits_with_a_clear_message(fake: Fake):
    result = fake.run(TPU, "--name", "prime-test", "--poll-interval", "0", "--timeout", "10", "up",
                      FAKE_QR_STATES="WAITING_FOR_RESOURCES,FAILED")
    assert result.returncode != 0
    assert "queued resource prime-test is FAILED, it will not become ACTIVE" in result.stderr
    assert "delete" in result.stderr  # says how to stop paying for it
    assert [gcloud_verb(c) for c in fake.calls("gcloud")] == [
        "queued-resources create", "queued-resources describe", "queued-resources describe"]


def test_tpu_wait_times_out(fake: Fake):
    result = fake.run(TPU, "--name", "prime-test", "--timeout", "0", "wait",
                      FAKE_QR_STATES="WAITING_FOR_RESOURCES")
    assert result.returncode != 0
    assert "timed out after 0s" in result.stderr and "WAITING_FOR_RESOURCES" in result.stderr
    assert [gcloud_verb(c) for c in fake.calls("gcloud")] == ["queued-resources describe"]


def test_tpu_dry_run_prints_every_command_and_calls_nothing(fake: Fake):
    result = fake.run(TPU, "--dry-run", "--name", "prime-test", "--accelerator-type", "v6e-8",
                      "--zone", "europe-west4-a", "--reserved", "up", "logs", "stop", "status",
                      "delete", "--wait", "--", TRICKY)
    assert result.returncode == 0, result.stderr
    assert fake_tools.read_calls(fake.state) == []
    assert list((fake.tmp / "tmp").iterdir()) == []
    commands = shown_commands(result.stdout)
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert [" ".join(c[3:5]) for c in gcloud] == [
        "queued-resources create", "queued-resources describe", "tpu-vm scp",
        "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh",
        "queued-resources describe", "queued-resources delete",
    ]
    assert [c[:3] for c in commands if c[0] != "gcloud"] == [["git", "-C", str(ROOT)]]
    create = gcloud[0]
    assert {"--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--reserved",
            "--zone=europe-west4-a"} <= set(create)
    assert "--spot" not in create
    script = lambda call: shlex.split(call[call.index("--command") + 1])  # noqa: E731
    assert "apt-get install -y -qq bubblewrap;" in " ".join(script(gcloud[4]))  # install
    for step, module in ((5, "prime_jax.preflight"), (6, "prime_jax.main")):
        words = script(gcloud[step])
        assert words[words.index(module) + 1:words.index(">")] == [
            "--config=configs/qwen7b.py", "--config.distributed=True", TRICKY]
    assert "--worker=0" in gcloud[7]  # logs
    assert "--async" not in gcloud[-1]  # delete --wait


def test_gpu_hosts_get_one_launch_each_with_distinct_process_ids(fake: Fake):
    hostfile = fake.tmp / "hosts.txt"
    hostfile.write_text("# GPU boxes\nalice@10.0.0.1\n10.0.0.2   # second\n\ngpu-c\n")
    result = fake.run(GPU, "--hosts", "hosts.txt", "--env", "WANDB_MODE=offline", "up",
                      "--", "--config.x=1")
    assert result.returncode == 0, result.stderr
    hosts = ["alice@10.0.0.1", "10.0.0.2", "gpu-c"]
    assert [c["argv"][-1].split(":")[0] for c in fake.calls("scp")] == hosts
    ssh_hosts = [fake_tools.ssh_positional(c["argv"])[0] for c in fake.calls("ssh")]
    assert sorted(ssh_hosts) == sorted(hosts * 4)  # unpack, install, preflight, run
    assert ssh_hosts[-3:] == hosts  # the launches, in hostfile order

    installs = [c for c in fake.calls("python") if c["argv"][:2] == ["-m", "pip"]]
    assert sorted(c["cwd"] for c in installs) == sorted(str(fake.host(h) / "prime_jax" / "src") for h in hosts)
    assert all(c["argv"][-1] == ".[cuda]" for c in installs)

    mains = {c["cwd"]: c for c in fake.mains(3)}
    assert len(mains) == 3
    for process_id, host in enumerate(hosts):
        main = mains[str(fake.host(host) / "prime_jax" / "src")]
        assert main["argv"] == ["-m", "prime_jax.main", "--config=configs/qwen7b.py",
                                "--config.distributed=True", "--config.x=1"]
        assert main["env"]["JAX_PROCESS_ID"] == str(process_id)
        assert main["env"]["JAX_NUM_PROCESSES"] == "3"
        assert main["env"]["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:8476"
        assert main["env"]["JAX_PLATFORMS"] is None and main["env"]["WANDB_MODE"] == "offline"
        src = fake.host(host) / "prime_jax" / "src"
        assert (src / "requirements.txt").read_text() == git_head_file("requirements.txt")


def test_tpu_failing_preflight_stops_before_main_and_prints_every_workers_failures(fake: Fake):
    result = fake.run(TPU, "--name", "prime-test", "--poll-interval", "0", "up",
                      FAKE_QR_STATES="ACTIVE", FAKE_TPU_WORKERS="3", FAKE_PREFLIGHT_FAIL="worker0,worker2")
    assert result.returncode != 0
    assert fake.mains(0) == []  # nothing started
    failures = [line for line in result.stderr.splitlines() if "] FAIL " in line]
    assert [line.split("[")[1].split("]")[0] for line in failures] == ["worker0", "worker2"]
    assert "preflight failed: training was not started" in result.stderr


def test_gpu_failing_preflight_stops_before_main(fake: Fake):
    (fake.tmp / "hosts.txt").write_text("h0\nh1\n")
    result = fake.run(GPU, "--hosts", "hosts.txt", "up", FAKE_PREFLIGHT_FAIL="h1")
    assert result.returncode != 0
    assert fake.mains(0) == []
    assert "preflight failed on: h1" in result.stderr
    assert "preflight [h1] FAIL sandbox" in result.stderr and "[h0] FAIL" not in result.stderr
    preflights = [c for c in fake.calls("python") if c["argv"][:2] == ["-m", "prime_jax.preflight"]]
    assert sorted(c["env"]["JAX_PROCESS_ID"] for c in preflights) == ["0", "1"]


def test_gpu_dry_run_prints_launches_and_calls_nothing(fake: Fake):
    (fake.tmp / "hosts.txt").write_text("h0\nh1\n")
    result = fake.run(GPU, "--dry-run", "--hosts", "hosts.txt", "--coordinator", "10.1.1.1",
                      "--port", "9999", "up")
    assert result.returncode == 0, result.stderr
    assert fake_tools.read_calls(fake.state) == []
    launches = [c[-1] for c in shown_commands(result.stdout) if c[0] == "ssh" and "prime_jax.main" in c[-1]]
    assert len(launches) == 2
    for process_id, script in enumerate(launches):
        assert f"JAX_PROCESS_ID={process_id} " in script
        assert "JAX_COORDINATOR_ADDRESS=10.1.1.1:9999 JAX_NUM_PROCESSES=2 " in script


def test_gpu_single_host_runs_refuses_a_second_start_and_stops(fake: Fake):
    python = fake_tools.install(fake.tmp / "venv" / "bin", "python")
    args = ("--python", str(python), "--log-dir", "logs")
    started = fake.run(GPU, *args, "run", FAKE_MAIN_SECONDS="60")
    assert started.returncode == 0, started.stderr
    pid = int((fake.tmp / "logs" / "main.pid").read_text())
    try:
        [main] = fake.mains(1)
        assert main["cwd"] == str(ROOT)
        assert main["argv"] == ["-m", "prime_jax.main", "--config=configs/qwen7b.py"]
        assert main["env"]["JAX_PLATFORMS"] is None and main["env"]["JAX_PROCESS_ID"] is None

        again = fake.run(GPU, *args, "run")
        assert again.returncode != 0 and "already runs" in again.stderr

        stopped = fake.run(GPU, *args, "stop")
        assert stopped.returncode == 0 and "stopped prime_jax.main" in stopped.stdout
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert fake.calls("ssh") == [] and fake.calls("scp") == []


@pytest.mark.parametrize("script, args, message", [
    (TPU, ["--name", "Bad_Name", "up"], "--name must be lowercase"),
    (TPU, ["up", "--zone"], "option --zone needs a value"),
    (TPU, ["frobnicate"], "unknown command 'frobnicate'"),
    (TPU, ["--env", "NOEQUALS", "run"], "--env wants NAME=VALUE"),
    (TPU, ["--accelerator-type", "v9-8", "create"], "no default runtime version for accelerator type 'v9-8'"),
    (TPU, ["--timeout", "soon", "wait"], "--timeout must be a non-negative integer"),
    (TPU, [], "no command given"),
    (GPU, ["--hosts", "missing.txt", "up"], "hostfile 'missing.txt' not found"),
    (GPU, ["--bogus", "up"], "unknown option '--bogus'"),
])
def test_bad_input_fails_naming_the_problem(fake: Fake, script: Path, args: list[str], message: str):
    result = fake.run(script, "--dry-run", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert fake_tools.read_calls(fake.state) == []


def test_gpu_hostfile_listing_a_host_twice_is_rejected(fake: Fake):
    (fake.tmp / "hosts.txt").write_text("h0\nh1\nh0\n")
    result = fake.run(GPU, "--dry-run", "--hosts", "hosts.txt", "up")
    assert result.returncode != 0 and "lists 'h0' twice" in result.stderr


def test_shellcheck_is_clean_on_every_launch_script():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    assert shellcheck.exists(), f"{shellcheck} missing: pip install -r requirements-dev.txt"
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {p.name for p in scripts} >= {"tpu.sh", "gpu.sh", "common.sh"}
    result = subprocess.run([str(shellcheck), *map(str, scripts)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
