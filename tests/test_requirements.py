"""requirements.txt resolves together with the vLLM release that Dockerfile.vllm builds on.

Dockerfile.vllm keeps the base image's torch and transformers and installs the rest of
requirements.txt together with ``vllm==<the image's version>``, so a pin outside a range in that
release's metadata (vLLM 0.30 asks for ``fastapi[standard]>=0.133.0,<0.137.0``) stops the build with
pip's ResolutionImpossible, and the vllm image never exists. This test runs the same resolution with
pip's own resolver in dry-run: it installs nothing and needs no GPU, only PyPI, whose PEP 658
metadata files let pip resolve without fetching the wheels (an index without them costs the full
downloads, several GB, but gives the same answer).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.servers import REPO

DOCKERFILE_VLLM = REPO / "Dockerfile.vllm"

# The interpreter and platform of the vllm/vllm-openai image, from vLLM's docker/Dockerfile: its
# vllm-base stage installs `python${PYTHON_VERSION}` (ARG PYTHON_VERSION=3.12) on
# FINAL_BASE_IMAGE=nvidia/cuda:...-ubuntu22.04, whose glibc 2.35 takes manylinux wheels up to 2_35;
# the workflow builds linux/amd64. The test resolves for that target whatever machine runs it, so a
# pin with no wheel for it fails here (stricter than the build, which could compile an sdist).
IMAGE_PYTHON = "3.12"
IMAGE_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",  # pip adds manylinux2010 and manylinux1 for it
    "linux_x86_64",
)
# PEP 508 marker values there (vLLM 0.30 asks for setuptools<81 only where python_version > "3.11").
IMAGE_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": f"{IMAGE_PYTHON}.0",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": f"{IMAGE_PYTHON}.0",
    "python_version": IMAGE_PYTHON,
    "sys_platform": "linux",
}

# `python -m pip` with environment markers evaluated for the image. pip applies --python-version and
# --platform to wheel tags and Requires-Python but evaluates markers for the interpreter running it
# (pypa/pip#11010, #13296); pex works around it the same way, by replacing the default environment
# of pip's vendored packaging, which Marker.evaluate reads on every call.
PIP_FOR_IMAGE = """
import json, runpy, sys
from pip._vendor.packaging import markers
image = {**markers.default_environment(), **json.loads(sys.argv.pop(1))}
markers.default_environment = lambda: dict(image)
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


def vllm_release() -> Version:
    """The vLLM version Dockerfile.vllm builds on: its ``ARG VLLM_VERSION`` image tag without the ``v``."""
    match = re.search(r"^ARG VLLM_VERSION=v?(\S+)$", DOCKERFILE_VLLM.read_text(), re.MULTILINE)
    assert match, "Dockerfile.vllm has no `ARG VLLM_VERSION=<tag>`"
    return Version(match[1])


def image_requirements() -> list[str]:
    """The requirement lines Dockerfile.vllm installs: requirements.txt through the Dockerfile's filter."""
    dockerfile = DOCKERFILE_VLLM.read_text()
    # The `grep -vE '<pattern>'` that drops the pins the base image's own builds replace.
    dropped = re.search(r"grep -vE '([^']+)' /tmp/requirements\.txt", dockerfile)
    assert dropped, "Dockerfile.vllm no longer filters requirements.txt with grep -vE: update this test"
    assert '"vllm==$(' in dockerfile, "Dockerfile.vllm no longer installs vllm==<version>: update this test"
    lines = (REPO / "requirements.txt").read_text().splitlines()
    kept = [line for line in lines if not re.search(dropped[1], line)]
    assert len(kept) < len(lines), f"{dropped[1]!r} drops nothing from requirements.txt"
    # Comments go as pip drops them: whole lines, and from whitespace followed by "#".
    return [requirement for line in kept if (requirement := re.sub(r"(^|\s)#.*", "", line).strip())]


def resolve_for_image(requirements: list[str], workdir: Path) -> dict[str, Any]:
    """pip's installation report for ``requirements`` in an empty vLLM image; fails with pip's reason."""
    requirements_file, report = workdir / "requirements-vllm.txt", workdir / "report.json"
    requirements_file.write_text("\n".join(requirements) + "\n")
    command = [
        sys.executable,
        "-c",
        PIP_FOR_IMAGE,
        json.dumps(IMAGE_MARKERS),
        "install",
        # The image build sees none of this machine's pip configuration (constraints, extra indexes).
        "--isolated",
        "--disable-pip-version-check",
        "--dry-run",
        "--ignore-installed",
        "--progress-bar=off",
        "--report",
        str(report),
        "--python-version",
        IMAGE_PYTHON,
        "--only-binary=:all:",  # pip's condition for --python-version and --platform
        *(f"--platform={platform}" for platform in IMAGE_PLATFORMS),
        "-r",
        str(requirements_file),
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=270, check=False)
    # pip explains a conflict ("The conflict is caused by: ...") on stdout, and states it on stderr.
    reason = "\n".join(done.stdout.splitlines()[-15:]) + "\n" + done.stderr
    assert done.returncode == 0, f"pip cannot resolve {requirements} for the vLLM image:\n{reason}"
    return json.loads(report.read_text())


def unmet_requirements(requirements: list[str], report: dict[str, Any]) -> list[str]:
    """Requirements that the report's set misses, in the image's marker environment.

    Checks the requested requirements and every resolved distribution's own (non-extra) ones, with
    ``packaging`` rather than pip: this is what shows that pip's markers were evaluated for the image.
    """
    environment = {**IMAGE_MARKERS, "extra": ""}  # evaluate() takes the rest from this interpreter
    resolved = {
        canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
        for item in report["install"]
    }
    wanted = [("requested", line) for line in requirements] + [
        (f"{item['metadata']['name']} {item['metadata']['version']}", line)
        for item in report["install"]
        for line in item["metadata"].get("requires_dist", [])
    ]
    unmet = []
    for who, line in wanted:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        version = resolved.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{who} needs {line}; resolved: {version}")
    return unmet


def test_requirements_resolve_with_the_vllm_release(tmp_path: Path) -> None:
    vllm = vllm_release()
    requirements = [*image_requirements(), f"vllm=={vllm}"]
    report = resolve_for_image(requirements, tmp_path)
    assert unmet_requirements(requirements, report) == []
