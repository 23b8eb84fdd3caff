"""pyproject.toml: dependencies are requirements.txt, and each accelerator extra matches what
the pinned jax itself declares (its extras and the libtpu its 'tpu' extra wants)."""
import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from setuptools.config.pyprojecttoml import read_configuration

ROOT = Path(__file__).resolve().parents[2]


def project() -> dict:
    return read_configuration(ROOT / "pyproject.toml", expand=True)["project"]


def pinned_jax() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("jax=="):
            return line.removeprefix("jax==")
    raise AssertionError("requirements.txt pins no jax")


def test_dependencies_are_the_requirements_file():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project()["dependencies"] == [line for line in lines if line and not line.startswith("#")]


def test_extras_pin_the_same_jax_with_its_own_accelerator_extras():
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project()["optional-dependencies"].items()}
    assert set(extras) == {"tpu", "cuda", "aot"}
    jax = pinned_jax()
    assert importlib.metadata.version("jax") == jax  # so the metadata read below is the pinned jax's
    jax_extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    for name, jax_extra in (("tpu", "tpu"), ("cuda", "cuda12")):
        [req] = extras[name]
        assert (req.name, req.extras, str(req.specifier)) == ("jax", {jax_extra}, f"=={jax}")
        assert jax_extra in jax_extras


# jax version -> (the libtpu its 'tpu' extra wants, the one pinned while that is not on PyPI). A new jax pin
# leaves this table behind, and the test is strict again.
UNRELEASED_LIBTPU = {"0.12.1": ("==0.0.53.*", "0.0.52")}


def test_aot_libtpu_is_the_one_jax_tpu_extra_requires():
    [aot] = project()["optional-dependencies"]["aot"]
    aot = Requirement(aot)
    [pinned] = list(aot.specifier)
    assert aot.name == "libtpu" and pinned.operator == "=="
    dev = [Requirement(line) for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
           if line.startswith("libtpu")]
    assert [str(r.specifier) for r in dev] == [str(aot.specifier)]  # the dev install compiles with the same libtpu
    wanted = [Requirement(r) for r in importlib.metadata.requires("jax")]
    [libtpu] = [r for r in wanted if r.name == "libtpu" and r.marker.evaluate({"extra": "tpu"})]
    if pinned_jax() in UNRELEASED_LIBTPU:
        assert (str(libtpu.specifier), pinned.version) == UNRELEASED_LIBTPU[pinned_jax()]
    else:
        assert libtpu.specifier.contains(pinned.version)
