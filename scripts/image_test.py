"""Build a container image of moondream-server for real and serve the tiny golden model from it.

``make image-test`` (CPU image, ``Dockerfile.cpu``) and ``make image-test-cuda`` (``Dockerfile``) run
this on a Linux machine as root, with Debian's ``buildah``, ``podman`` and ``debootstrap`` and no
container daemon:

1. a local base image: ``debootstrap`` makes a Debian bookworm root file system with Python 3.11,
   ``podman import`` turns it into ``localhost/...`` (no registry pull), and the Dockerfile gets it
   through its ``PYTHON_IMAGE`` build argument (users keep the public ``python:3.11-slim`` default);
2. ``buildah bud --isolation chroot --network host --format docker`` builds the Dockerfile; this
   machine's pip configuration (local indexes, wheel folders, constraints) reaches the ``RUN pip``
   steps through read-only mounts and the build-stage ``PIP_CONFIG_FILE`` argument, never a layer;
3. the image is inspected: size, largest installed packages, no pip configuration, CUDA libraries,
   compilers or pip cache where they do not belong;
4. ``buildah from`` + ``buildah run`` start the server inside the image on the host network with the
   tiny checkpoint of ``tests/fixtures`` mounted read-only; the script checks that the image's
   HEALTHCHECK fails before the server listens and passes once ``/health/ready`` answers, that the
   server process runs as the image's non-root user, and that one caption and one detection through
   ``/v1`` equal the official implementation's golden outputs for that checkpoint;
5. everything it created is removed (``--keep`` keeps the images).

Lines that start with ``image-test:`` are the results worth keeping.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts import host_pip_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "moondream2-tiny"
#: The server resizes with libvips, so its answers are checked against the libvips-path golden set.
GOLDEN = TINY / "vips" / "expected.json"
GOLDEN_IMAGE = "img2"
#: buildah's default OCI runtime cannot start containers on these hosts (cgroups in hybrid mode).
BUILDAH_RUN = ("buildah", "run", "--isolation", "chroot", "--network", "host")
MODEL_INSIDE = "/models/moondream2-tiny"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
#: Per run (suffix: the process id), so that two runs on one machine never touch each other's images.
BASE_TAG = "localhost/moondream-image-test-base:bookworm-{run}"
IMAGE_TAG = "localhost/moondream-server-image-test:{flavour}-{run}"
TEXT_SETTINGS = {"max_tokens": 12, "temperature": 0.0}
REGION_SETTINGS = {"max_objects": 4}
BOX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Flavour:
    name: str
    dockerfile: str
    #: The largest image accepted (bytes), or None.
    max_size: int | None
    #: Whether torch must report a CUDA version.
    cuda: bool


FLAVOURS = {
    # The CPU image's target: under 2.5 GB (decimal, as `docker images` counts).
    "cpu": Flavour("cpu", "Dockerfile.cpu", 2_500_000_000, False),
    "cuda": Flavour("cuda", "Dockerfile", None, True),
}


class ImageTestError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(cmd: Sequence[str], *, check: bool = True, capture: bool = True, timeout: float = 600) -> str:
    """Run a command; its output is returned (captured) or streamed to this log."""
    result = subprocess.run(
        list(cmd),
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise ImageTestError(f"{' '.join(cmd[:3])} ... exited {result.returncode}:\n{result.stdout or ''}")
    return result.stdout or ""


def require_tools() -> None:
    if os.geteuid() != 0:
        raise ImageTestError("run as root (debootstrap and buildah's chroot isolation need it)")
    missing = [t for t in ("buildah", "podman", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise ImageTestError(f"missing {', '.join(missing)}: apt-get install -y buildah podman debootstrap")


def make_base(work: Path, mirror: str, tag: str) -> None:
    """Debian bookworm (Python 3.11) from Debian's packages, imported as a local image."""
    rootfs = work / "rootfs"
    say(f"base: debootstrap bookworm from {mirror} with {' '.join(BASE_PACKAGES)}")
    started = time.monotonic()
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(rootfs),
            mirror,
        ],
        timeout=1800,
    )
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    changes = ["ENV LANG=C.UTF-8", 'CMD ["python3"]']
    imported = subprocess.run(
        ["podman", "import", *(a for c in changes for a in ("--change", c)), "-", tag],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    if tar.stdout is not None:
        tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise ImageTestError(f"podman import failed: {imported.stderr}")
    shutil.rmtree(rootfs)
    say(f"base: {tag} made in {time.monotonic() - started:.0f} s")


def torch_index_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (urllib.error.URLError, OSError):
        return False


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1].strip()
    raise ImageTestError(f"{dockerfile.name} has no ARG {name}=")


def build(flavour: Flavour, tag: str, base: str, work: Path, log: Path) -> float:
    """Build the image with this machine's pip configuration mounted in; returns the seconds taken."""
    dockerfile = REPO / flavour.dockerfile
    pip = host_pip_config.for_build(
        host_pip_config.read_host_config(), drop_find_links_with="torch-*+cpu*" if flavour.cuda else None
    )
    pip_dir = work / "pip"
    pip.write(pip_dir)
    for note in pip.notes:
        say(f"pip: {note}")
    say(f"pip: {len(pip.mounts)} host paths mounted read-only under {host_pip_config.MOUNT_ROOT}")
    args = [
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--build-arg",
        f"PIP_CONFIG_FILE={host_pip_config.MOUNT_ROOT}/{host_pip_config.CONF_NAME}",
    ]
    index = dockerfile_arg(dockerfile, "TORCH_INDEX_URL")
    if not torch_index_reachable(index):
        # Here the PyTorch index cannot be reached; the torch pin then comes from this machine's own
        # pip sources (for the CPU image: its local +cpu wheel). The image is checked below for the
        # torch build it must have, so a wrong substitute fails the test.
        fallback = pip.sections.get("global", {}).get("index-url", "https://pypi.org/simple")
        say(f"build: {index} is unreachable from here; torch comes from {fallback} + the local pip sources")
        args += ["--build-arg", f"TORCH_INDEX_URL={fallback}"]
    cmd = [
        "buildah",
        "bud",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--format",
        "docker",
        "--layers=false",
        *pip.volume_args(pip_dir),
        *args,
        "-f",
        str(dockerfile),
        "-t",
        tag,
        str(REPO),
    ]
    say(f"build: {' '.join(cmd)}")
    say(f"build: log -> {log}")
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if (
                line.startswith(("[1/2] STEP", "[2/2] STEP", "torch ", "moondream_server "))
                or "error" in line
            ):
                print(f"    {line.rstrip()}", flush=True)
        code = proc.wait()
    seconds = time.monotonic() - started
    if code != 0:
        raise ImageTestError(f"buildah bud exited {code} after {seconds:.0f} s; see {log}")
    return seconds


def inspect_image(tag: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run(["buildah", "inspect", "--type", "image", tag]))
    return data


def image_size(tag: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", tag]).strip())


def du_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextmanager
def working_container(tag: str, name: str) -> Iterator[str]:
    run(["buildah", "from", "--name", name, tag])
    try:
        yield name
    finally:
        run(["buildah", "rm", name], check=False)


def check_config(config: dict[str, Any]) -> None:
    """The image's configuration and history hold no trace of the build's pip configuration."""
    text = json.dumps(config)
    env = (config.get("Docker", {}).get("config") or {}).get("Env") or []
    leaks = [e for e in env if e.startswith("PIP_")]
    leaks += [word for word in ("PIP_CONFIG_FILE", f"{host_pip_config.MOUNT_ROOT}/") if word in text]
    if leaks:
        raise ImageTestError(f"the image's configuration or history names the build's pip setup: {leaks}")
    say("config: no PIP_* variable, no trace of the build's pip configuration in the image's history")


def check_contents(flavour: Flavour, container: str) -> None:
    """What the image holds: biggest packages, and nothing that must not be there."""
    root = Path(run(["buildah", "mount", container]).strip())
    try:
        site = next((root / "opt/venv/lib").glob("python3*/site-packages"))
        sizes = sorted(((du_bytes(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)
        say("contents: largest in /opt/venv: " + ", ".join(f"{n} {s / 2**20:.0f} MiB" for s, n in sizes[:6]))
        problems = []
        confs = [
            p
            for d in ("etc", "root", "home", "opt/venv")
            for p in (root / d).rglob("pip.conf")
            if (root / d).exists()
        ]
        confs += [p for p in (root / "etc/xdg/pip").glob("*")] if (root / "etc/xdg/pip").exists() else []
        if confs:
            problems.append(f"pip configuration baked in: {[str(p.relative_to(root)) for p in confs]}")
        if any((root / "mnt").iterdir()):
            problems.append(f"/mnt is not empty: {[p.name for p in (root / 'mnt').iterdir()]}")
        for cache in ("root/.cache/pip", "home/moondream/.cache/pip"):
            if (root / cache).exists():
                problems.append(f"pip cache left in /{cache}")
        compilers = [c for c in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/g++") if (root / c).exists()]
        if compilers:
            problems.append(f"build tools in the image: {compilers}")
        nvidia = [p.stem for p in [*site.glob("nvidia*.dist-info"), *site.glob("cuda*.dist-info")]]
        if not flavour.cuda and nvidia:
            problems.append(f"CUDA libraries in the CPU image: {nvidia}")
        if flavour.cuda:
            say(f"contents: CUDA packages: {', '.join(sorted(nvidia)) or 'none'}")
        if problems:
            raise ImageTestError("; ".join(problems))
        say(
            "contents: no pip configuration, no pip cache, no compiler"
            + ("" if flavour.cuda else ", no CUDA")
        )
    finally:
        run(["buildah", "umount", container], check=False)


def check_torch(flavour: Flavour, container: str) -> None:
    code = (
        "import moondream_server.model, torch; "
        "print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    )
    version, cuda, available = run([*BUILDAH_RUN, container, "--", "python", "-c", code]).split()[-3:]
    say(f"torch: {version}, torch.version.cuda = {cuda}, GPU available here: {available}")
    if flavour.cuda != (cuda != "None"):
        raise ImageTestError(f"the {flavour.name} image has torch {version} with CUDA {cuda}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def server_process(launcher: int) -> int | None:
    """The Python process running the console script below ``launcher``.

    buildah's chroot helper in between is named ``buildah-chroot-exec /opt/venv/bin/moondream-server``;
    a signal to it kills the server outright, so only the interpreter itself counts.
    """
    for pid in descendants(launcher):
        with suppress(OSError):
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            if (
                len(argv) > 1
                and os.path.basename(argv[0]).startswith(b"python")
                and os.path.basename(argv[1]) == b"moondream-server"
            ):
                return pid
    return None


def process_uids(pid: int) -> list[int]:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(u) for u in line.split()[1:]]
    raise ImageTestError(f"no Uid line for process {pid}")


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def healthcheck_command(config: dict[str, Any]) -> list[str]:
    check = (config.get("Docker", {}).get("config") or {}).get("Healthcheck") or {}
    test = list(check.get("Test") or [])
    if not test or test[0] not in ("CMD", "CMD-SHELL"):
        raise ImageTestError(f"the image has no HEALTHCHECK (built without --format docker?): {check}")
    return test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]


def boxes_close(got: list[dict[str, float]], want: list[dict[str, float]]) -> bool:
    keys = ("x_min", "y_min", "x_max", "y_max")
    return len(got) == len(want) and all(
        math.isclose(g[k], w[k], abs_tol=BOX_TOLERANCE) for g, w in zip(got, want, strict=True) for k in keys
    )


def serve_and_check(flavour: Flavour, config: dict[str, Any], container: str, work: Path) -> None:
    port = free_port()
    healthcheck = healthcheck_command(config)
    user = (config.get("Docker", {}).get("config") or {}).get("User", "")
    say(f"image: USER {user!r}, HEALTHCHECK {healthcheck}")
    uid = int(user.split(":")[0]) if user.split(":")[0].isdigit() else None
    if not uid:
        raise ImageTestError(f"the image's USER {user!r} is not a non-root numeric uid")
    # Golden outputs are fp32; the CUDA image is exercised on this machine's CPU.
    env = {
        "MOONDREAM_PORT": str(port),
        "MOONDREAM_MODEL": MODEL_INSIDE,
        "MOONDREAM_DTYPE": "float32",
        "HF_HUB_OFFLINE": "1",
    }
    if flavour.cuda:
        env["MOONDREAM_DEVICE"] = "cpu"
    env_args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    buildah_run = [*BUILDAH_RUN, *env_args]

    before = subprocess.run([*buildah_run, container, "--", *healthcheck], capture_output=True, text=True)
    said = (before.stdout + before.stderr).strip().splitlines()[:1]
    say(f"healthcheck before the server starts: exit {before.returncode} ({' '.join(said)})")
    if before.returncode == 0:
        raise ImageTestError("the HEALTHCHECK passed with no server running")

    log = work / "server.log"
    say(f"serve: moondream-server in the image on 0.0.0.0:{port} (host network), model {MODEL_INSIDE}")
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [*buildah_run, "--volume", f"{TINY}:{MODEL_INSIDE}:ro", container, "--", "moondream-server"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server: int | None = None
    try:
        base = f"http://127.0.0.1:{port}"
        started, deadline = time.monotonic(), time.monotonic() + 300
        while True:
            if launcher.poll() is not None:
                raise ImageTestError(f"the server exited {launcher.returncode}:\n{log.read_text()[-3000:]}")
            with suppress(urllib.error.URLError, OSError, ValueError):
                if http_json(f"{base}/health/ready", timeout=5)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise ImageTestError(f"/health/ready not 200 within 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        say(f"serve: /health/ready 200 after {time.monotonic() - started:.1f} s")

        server = server_process(launcher.pid)
        if server is None:
            raise ImageTestError("cannot find the moondream-server process")
        uids = process_uids(server)
        say(f"serve: server process {server} runs as uid {uids[0]} (real, effective, saved, fs: {uids})")
        if set(uids) != {uid}:
            raise ImageTestError(f"the server runs as {uids}, not the image's user {uid}")

        after = subprocess.run([*buildah_run, container, "--", *healthcheck], capture_output=True, text=True)
        say(f"healthcheck with the server ready: exit {after.returncode} ({after.stdout.strip()})")
        if after.returncode != 0:
            raise ImageTestError(f"the HEALTHCHECK failed: {after.stdout}{after.stderr}")

        golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["images"][GOLDEN_IMAGE]
        data = base64.b64encode((TINY / golden["file"]).read_bytes()).decode()
        image_url = f"data:image/png;base64,{data}"
        status, caption = http_json(
            f"{base}/v1/caption", {"image_url": image_url, "length": "normal", "settings": TEXT_SETTINGS}
        )
        want_caption = golden["tasks"]["caption_normal"]["result"]["caption"]
        say(f"caption ({GOLDEN_IMAGE}): HTTP {status} {json.dumps(caption)[:300]}")
        if status != 200 or caption.get("caption") != want_caption:
            raise ImageTestError(f"caption: want {want_caption!r} (golden)")
        status, detect = http_json(
            f"{base}/v1/detect", {"image_url": image_url, "object": "cat", "settings": REGION_SETTINGS}
        )
        want_boxes = golden["tasks"]["detect"]["result"]["objects"]
        say(f"detect ({GOLDEN_IMAGE}, 'cat'): HTTP {status} {json.dumps(detect)[:900]}")
        if status != 200 or not boxes_close(detect.get("objects", []), want_boxes):
            raise ImageTestError(f"detect: want {want_boxes} (golden, ±{BOX_TOLERANCE})")
        say("answers: caption and detect equal the official implementation's golden outputs")
    except BaseException:
        stop(launcher, server, log)
        raise
    # `docker stop` sends the same signal: the server drains and exits 0 (api/shutdown.py).
    code = stop(launcher, server, log)
    if code != 0:
        raise ImageTestError(f"the server did not stop cleanly on SIGTERM (exit {code})")
    say("serve: graceful stop on SIGTERM (exit 0)")


def stop(launcher: subprocess.Popen[bytes], server: int | None, log: Path) -> int | None:
    """SIGTERM the server (a graceful shutdown), then kill the launcher's session if anything is left.

    Returns ``buildah run``'s exit status (the server's), or None when it had to be killed.
    """
    if server is None:
        server = server_process(launcher.pid)
    if server is not None:
        with suppress(ProcessLookupError):
            os.kill(server, signal.SIGTERM)
    try:
        code = launcher.wait(timeout=60)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        say(f"serve: SIGTERM -> exit {code} ({' | '.join(tail)})")
        return code
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        say("serve: the server ignored SIGTERM for 60 s and was killed")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--cuda", action="store_true", help="build Dockerfile (CUDA) instead of Dockerfile.cpu"
    )
    parser.add_argument("--base", help="use this base image instead of a debootstrapped Debian bookworm")
    parser.add_argument("--keep", action="store_true", help="keep the built images (and the base image)")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for the base")
    parser.add_argument(
        "--image", help="test this image (built before, e.g. with --keep) instead of building"
    )
    parser.add_argument("--workdir", default="/var/tmp", help="where the base root file system is made")
    args = parser.parse_args(argv)
    flavour = FLAVOURS["cuda" if args.cuda else "cpu"]

    require_tools()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="moondream-image-test-", dir=args.workdir))
    made: list[str] = []
    container = f"moondream-image-test-{os.getpid()}"
    try:
        if args.image:
            tag = args.image
        else:
            base = args.base or BASE_TAG.format(run=os.getpid())
            if args.base is None:
                make_base(work, args.mirror, base)
                made.append(base)
            say(f"base: {base}")
            tag = IMAGE_TAG.format(flavour=flavour.name, run=os.getpid())
            seconds = build(flavour, tag, base, work, work / "build.log")
            made.append(tag)
            say(f"built {tag} from {flavour.dockerfile} in {seconds:.0f} s")
        size = image_size(tag)
        say(f"image size {size / 1e9:.2f} GB ({size} bytes)")
        if flavour.max_size is not None and size > flavour.max_size:
            raise ImageTestError(f"image is {size / 1e9:.2f} GB, over {flavour.max_size / 1e9:.2f} GB")
        config = inspect_image(tag)
        with working_container(tag, container):
            check_config(config)
            check_contents(flavour, container)
            check_torch(flavour, container)
            serve_and_check(flavour, config, container, work)
        say(f"PASS ({flavour.name} image) in {time.monotonic() - started:.0f} s")
        return 0
    except ImageTestError as exc:
        say(f"FAIL: {exc}")
        return 1
    finally:
        if args.keep and made:
            say(f"kept {', '.join(made)}")
        else:
            for image in reversed(made):
                run(["buildah", "rmi", "--force", image], check=False)
            if made:
                say(f"removed {', '.join(made)}")
        build_log = work / "build.log"
        if build_log.exists():
            kept = Path(tempfile.gettempdir()) / f"moondream-image-test-{flavour.name}-build.log"
            shutil.copy(build_log, kept)
            say(f"build log kept in {kept}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
