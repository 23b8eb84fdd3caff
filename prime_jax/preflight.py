"""Preflight: every worker proves it can run PRIME before the expensive run starts.

    python -m prime_jax.preflight --config=configs/qwen7b.py [--config.* overrides]

Run by `launch/tpu.sh up` and `launch/gpu.sh up` on every worker before `main`. Each check prints one
line, `PASS`/`FAIL`, prefixed by the process index; a FAIL line ends with the fix. The exit code is 1
if any check failed on this process, so the launchers stop before training starts.

Checks (in order; a check that needs what an earlier one found missing is skipped with its FAIL):
- config:    the config's values check out (the same one-line errors as `main`);
- devices:   the config's mesh fits the devices JAX sees, on every process;
- settings:  the config resolves on that mesh (model paths, batching over the mesh, KV-cache budget);
- workdir:   write, list, read back and delete a file under the workdir (local or gs://);
- model:     the policy / PRM / reference directories hold a readable config.json, the tokenizer loads;
- data:      the train/validation globs match files and their first rows parse;
- verifiers: a math item and a code item score right and wrong as they should; the code sandbox is the
             real one (bubblewrap works) and hostile programs (kill-parent, write outside /tmp) are contained;
- memory:    on a TPU slice, every program compiled ahead of time for it (prime_jax.aot) fits HBM; elsewhere
             the resident state of the config (analytic plan) fits the device memory JAX reports.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from prime_jax import aot, cli, paths, settings
from prime_jax.data.eurus import read_eurus
from prime_jax.data.tfds_reader import iter_tfds_rows
from prime_jax.distributed import init_distributed
from prime_jax.memory_plan import CPU_COMPILER_HEAP_BYTES, GIB, plan
from prime_jax.mesh import make_mesh
from prime_jax.models import ModelConfig, read_hf_config
from prime_jax.models.tokenizer import load_tokenizer
from prime_jax.verifiers import code, math
from prime_jax.verifiers.sandbox import bwrap_available

# Resolves a config whose model cannot be read yet, so that every other check still runs (the model lines fail).
STAND_IN_ARCH = ModelConfig(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                            num_heads=1, num_kv_heads=1, head_dim=8)
BWRAP_FIX = "install bubblewrap on this host: sudo apt-get install -y bubblewrap (launch/*.sh install does it)"


@dataclasses.dataclass(frozen=True)
class Check:
    """One preflight result: `name` PASS/FAIL with what was found, and for a FAIL the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self, process: int, processes: int) -> str:
        head = f"preflight [process {process}/{processes}] {'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return head if self.ok else f"{head} -- fix: {self.fix}"


def _fail(name: str, e: BaseException, fix: str) -> Check:
    return Check(name, False, f"{type(e).__name__}: {e}".splitlines()[0], fix)


# --- the checks --------------------------------------------------------------------------------------

def check_devices(c: ml_collections.ConfigDict) -> tuple[Check, Mesh | None]:
    """The config's mesh can be built over every device of the run."""
    seen = (f"{jax.device_count()} {jax.default_backend()} devices ({jax.local_device_count()} local), "
            f"{jax.process_count()} processes")
    try:
        mesh = make_mesh(settings.mesh_axes(c))
    except ValueError as e:
        return Check("devices", False, f"{seen}; {e}",
                     "set --config.mesh.* so that data * fsdp * tensor equals the device count (fsdp=-1 takes the rest), "
                     "or run on the slice the config was written for"), None
    return Check("devices", True, f"{seen}; mesh {dict(mesh.shape)}"), mesh


def check_workdir(s: settings.RunSettings) -> Check:
    """The workdir can be written, listed, read back and cleaned (each process its own file)."""
    fix = f"make {s.workdir} writable by this host (for gs://: the VM's service account needs storage.objects.create/get/list/delete on the bucket)"
    try:
        probe = paths.path(s.workdir) / "preflight" / f"process{jax.process_index()}-{uuid.uuid4().hex}.txt"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("prime_jax preflight")
        listed = probe.name in {p.name for p in probe.parent.iterdir()}
        back = probe.read_text()
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - any storage error is a FAIL line, not a traceback
        return _fail("workdir", e, fix)
    if not listed or back != "prime_jax preflight":
        return Check("workdir", False, f"{probe} did not list or read back what was written", fix)
    return Check("workdir", True, f"{s.workdir} writable, listable, readable")


def check_models(s: settings.RunSettings) -> list[Check]:
    """config.json of policy / PRM / reference and the tokenizer load (the built-in run makes its own)."""
    m = s.model
    if s.warm_start.needed:
        return [Check("model", True, "built-in synthetic run: main trains the warm-start model itself")]
    checks = []
    for name, path in (("model.path", m.path), ("model.prm_path", m.prm_path), ("model.ref_path", m.ref_path)):
        try:
            cfg = read_hf_config(path)
            checks.append(Check(name, True, f"{path}: {cfg.model_type}, {cfg.num_params / 1e9:.2f}B params"))
        except Exception as e:  # noqa: BLE001
            checks.append(_fail(name, e, f"point --config.{name} at an HF model directory (config.json + *.safetensors) this host can read"))
    try:
        tok = load_tokenizer(m.tokenizer)
        checks.append(Check("model.tokenizer", True, f"{m.tokenizer}: vocabulary {tok.vocab_size}"))
    except Exception as e:  # noqa: BLE001
        checks.append(_fail("model.tokenizer", e, "point --config.model.tokenizer (or model.path) at a tokenizer this host can read"))
    return checks


def check_data(s: settings.RunSettings, rows: int = 8) -> list[Check]:
    """Each configured split's files exist and their first `rows` rows parse into examples."""
    d = s.data
    if d.source == "synthetic":
        return [Check("data", True, "synthetic tasks (generated in process)")]
    if d.source == "tfds":
        try:
            n = sum(1 for _ in itertools.islice(iter_tfds_rows(d.tfds_dir, "train"), rows))
        except Exception as e:  # noqa: BLE001
            return [_fail("data.tfds_dir", e, "prepare the TFDS dataset (third_party/eurus2_rl_data) and pass --config.data.tfds_dir")]
        return [Check("data.tfds_dir", True, f"{d.tfds_dir}: first {n} train rows read")]
    checks = []
    for key, globs in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        if not globs:
            if key == "data.train_files":
                checks.append(Check(key, False, "no training data configured", f"pass --config.{key}=<JSONL/Parquet glob>"))
            continue
        try:
            result = read_eurus(list(globs), max_rows_per_file=rows)
        except Exception as e:  # noqa: BLE001
            checks.append(_fail(key, e, f"fix --config.{key}: every glob must match readable .jsonl/.parquet files"))
            continue
        if not result.examples:
            checks.append(Check(key, False, f"none of the first {rows} rows per file parse (skipped: {dict(result.skipped)})",
                                "the files must follow the Eurus-2-RL-Data schema (README: data)"))
        else:
            checks.append(Check(key, True, f"{','.join(globs)}: {len(result.examples)} of the first rows parse"
                                f"{f', skipped {dict(result.skipped)}' if result.skipped else ''}"))
    return checks


# Each verifier probe: (name, response, ground truth, ability, expected score).
_PROBES = (
    ("math right", "So the answer is \\boxed{\\frac{1}{2}}.", "0.5", "math", 1.0),
    ("math wrong", "So the answer is \\boxed{3}.", "0.5", "math", 0.0),
    ("code right", "```python\ndef add(a, b):\n    return a + b\n```", '{"prelude": "", "asserts": ["assert add(2, 3) == 5"]}', "code", 1.0),
    ("code wrong", "```python\ndef add(a, b):\n    return a - b\n```", '{"prelude": "", "asserts": ["assert add(2, 3) == 5"]}', "code", 0.0),
)


def _score(ability: str, response: str, truth: str) -> float:
    return math.score(response, truth) if ability == "math" else code.score(response, truth)


def _hostile(kind: str, target: str) -> None:
    """Child process: runs a hostile program through the code verifier (its parent is this child)."""
    program = {"kill-parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
               "write-outside-tmp": f"open({target!r}, 'w').write('escaped')"}[kind]
    _score("code", f"```python\n{program}\n```", '{"prelude": "", "asserts": ["assert True"]}')


def check_verifiers() -> list[Check]:
    """Known answers score right; the sandbox is bubblewrap; hostile programs cannot reach this host."""
    checks = []
    for name, response, truth, ability, want in _PROBES:
        fix = BWRAP_FIX if ability == "code" else "reinstall the requirements (math-verify) on this host"
        try:
            got = _score(ability, response, truth)
        except Exception as e:  # noqa: BLE001
            checks.append(_fail(f"verifier {name}", e, fix))
            continue
        checks.append(Check(f"verifier {name}", got == want, f"scored {got} (expected {want})", fix))
    real = bwrap_available()
    checks.append(Check("sandbox", real, "bubblewrap works" if real else "no working bubblewrap: code would not be sandboxed", BWRAP_FIX))
    if not real:
        return checks
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as outside:
        target = os.path.join(outside, "escaped.txt")
        for kind in ("kill-parent", "write-outside-tmp"):
            child = ctx.Process(target=_hostile, args=(kind, target))
            child.start()
            child.join(120)
            ok = child.exitcode == 0 and not os.path.exists(target)
            checks.append(Check(f"sandbox {kind}", ok, "contained" if ok else f"NOT contained (verifier process exit code {child.exitcode}, "
                                f"file written outside /tmp: {os.path.exists(target)})", BWRAP_FIX))
    return checks


# JAX's device_kind of each TPU generation -> prime_jax.aot's generation name.
_TPU_KINDS = {"TPU v4": "v4", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
              "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def tpu_topology(devices: list) -> aot.Topology | None:
    """The slice these TPU devices form, as `prime_jax.aot` names it; None off TPU or for a shape aot does not know."""
    gen = _TPU_KINDS.get(devices[0].device_kind) if devices and devices[0].platform == "tpu" else None
    try:
        return aot.Topology(gen, aot.slice_dims(gen, len(devices))) if gen else None
    except ValueError:
        return None


MEMORY_FIX = ("use more devices (mesh.fsdp), fewer prompts per sampler call (rollout.prompts_per_call) or smaller "
              "micro batches; per-program figures: python -m prime_jax.aot --config=... --topology=...")


def aot_memory_check(topology: aot.Topology, reports: list[aot.ProgramReport]) -> Check:
    """The memory line from the run's programs compiled for `topology`: the worst peak against HBM."""
    worst = max(reports, key=lambda r: r.peak_bytes)
    return Check("memory", all(r.fits(topology.chip) for r in reports),
                 f"AOT {topology.name}: peak {worst.peak_bytes / GIB:.2f} GiB/device ({worst.name}) of "
                 f"{topology.chip.hbm_bytes / GIB:.0f} GiB HBM", MEMORY_FIX)


def check_memory(c: ml_collections.ConfigDict, s: settings.RunSettings, topology: aot.Topology | None = None) -> Check:
    """On a TPU slice (`topology`): every program of the run compiled ahead of time for it (`prime_jax.aot`, the
    compiler's own peak per device) fits HBM. Elsewhere: the analytic plan's peak per device (`memory_plan`:
    resident models + the larger of a sampler call and an update) fits the memory JAX reports for device 0
    (`bytes_limit`); on CPU, where the devices share the host, the plan over all local devices plus what this process
    holds already (Python, the libraries) and the heap XLA:CPU's compiler leaves behind fits the host's memory."""
    if topology is not None:
        try:
            return aot_memory_check(topology, aot.compile_run(aot.topology_settings(c, topology), topology))
        except Exception as e:  # noqa: BLE001
            return _fail("memory", e, MEMORY_FIX)
    try:
        need = plan(s).peak * GIB
    except Exception as e:  # noqa: BLE001
        return _fail("memory", e, "give --config.model.path (config.json) or model.arch so the plan knows the architecture")
    if jax.default_backend() == "cpu":
        held = process_rss()
        need = need * jax.local_device_count() + held + CPU_COMPILER_HEAP_BYTES
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Check("memory", need < limit, f"peak plan {need / GIB:.2f} GiB (with this process's {held / GIB:.2f} "
                     f"and the compiler's {CPU_COMPILER_HEAP_BYTES / GIB:.2f}) of {limit / GIB:.2f} GiB host memory",
                     MEMORY_FIX)
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return Check("memory", True, f"peak plan {need / GIB:.2f} GiB/device; {jax.default_backend()} reports no device limit")
    return Check("memory", need < limit, f"peak plan {need / GIB:.2f} GiB of {limit / GIB:.2f} GiB/device", MEMORY_FIX)


def process_rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# --- driver ------------------------------------------------------------------------------------------

def run_checks(c: ml_collections.ConfigDict) -> Iterator[Check]:
    """All checks in order; stops after a failed config or devices check (the rest would not mean much)."""
    try:
        settings.check(c)
    except settings.ConfigError as e:
        yield Check("config", False, str(e), "fix the named config value")
        return
    yield Check("config", True, "valid")
    devices, mesh = check_devices(c)
    yield devices
    if mesh is None:
        return
    try:  # an unreadable model is reported by the model lines below; the other checks still run
        arch = settings.read_architecture(c)
    except settings.ConfigError:
        arch = STAND_IN_ARCH
    try:
        s = settings.resolve(c, mesh, arch)
    except settings.ConfigError as e:
        yield Check("settings", False, str(e), "fix the named config value")
        return
    yield Check("settings", True, settings.describe(s) if arch is not STAND_IN_ARCH else "resolved (model not read)")
    yield check_workdir(s)
    models = check_models(s)
    yield from models
    yield from check_data(s)
    yield from check_verifiers()
    if all(m.ok for m in models):
        yield check_memory(c, s, tpu_topology(jax.devices()))
    else:
        yield Check("memory", False, "not checked: the plan needs the model's config.json", "fix the model lines above")


def preflight(c: ml_collections.ConfigDict) -> bool:
    """Prints one line per check (stdout, flushed as it goes); True when every check passed."""
    ok = True
    for check in run_checks(c):
        print(check.line(jax.process_index(), jax.process_count()), flush=True)
        ok &= check.ok
    print(f"preflight [process {jax.process_index()}/{jax.process_count()}] {'PASSED' if ok else 'FAILED'}", flush=True)
    return ok


def main(argv) -> None:
    del argv
    c = cli.load_config(_CONFIG)
    if settings.wants_distributed(c):
        init_distributed()
    sys.exit(0 if preflight(c) else 1)


if __name__ == "__main__":  # the flag is defined here only, so this module imports beside prime_jax.main
    _CONFIG = cli.config_flag()
    cli.run(main)
