"""The image test's own logic that runs without buildah: what it reads from the Dockerfiles and the
image configuration, how it finds the server process and compares the answers with the golden set.
The build and the run themselves are `make image-test` (DEVELOPERS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import image_test as it


def test_dockerfile_args_are_read_from_the_real_dockerfiles() -> None:
    assert it.dockerfile_arg(it.REPO / "Dockerfile.cpu", "TORCH_INDEX_URL").endswith("/whl/cpu")
    assert it.dockerfile_arg(it.REPO / "Dockerfile", "TORCH_INDEX_URL") == "https://pypi.org/simple"
    with pytest.raises(it.ImageTestError):
        it.dockerfile_arg(it.REPO / "Dockerfile", "NO_SUCH_ARG")


def test_healthcheck_command_from_the_image_configuration() -> None:
    exec_form = {"Docker": {"config": {"Healthcheck": {"Test": ["CMD", "python", "-m", "x"]}}}}
    shell_form = {"Docker": {"config": {"Healthcheck": {"Test": ["CMD-SHELL", "curl -f localhost"]}}}}
    assert it.healthcheck_command(exec_form) == ["python", "-m", "x"]
    assert it.healthcheck_command(shell_form) == ["/bin/sh", "-c", "curl -f localhost"]
    # an OCI-format image drops HEALTHCHECK: the test must say so, not pass
    with pytest.raises(it.ImageTestError, match="HEALTHCHECK"):
        it.healthcheck_command({"Docker": {"config": {}}})


def test_golden_answers_are_the_libvips_ones_the_server_gives() -> None:
    golden = json.loads(it.GOLDEN.read_text(encoding="utf-8"))["images"][it.GOLDEN_IMAGE]["tasks"]
    assert golden["caption_normal"]["result"]["caption"] == "How"
    assert len(golden["detect"]["result"]["objects"]) == it.REGION_SETTINGS["max_objects"]


def test_boxes_close_within_tolerance_only() -> None:
    box = {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}
    near = {k: v + it.BOX_TOLERANCE / 2 for k, v in box.items()}
    far = {**box, "y_max": 0.4 + 10 * it.BOX_TOLERANCE}
    assert it.boxes_close([near], [box])
    assert not it.boxes_close([far], [box])
    assert not it.boxes_close([box, box], [box])
    assert not it.boxes_close([], [box])


def test_server_process_is_the_interpreter_not_buildahs_helper(tmp_path: Path) -> None:
    """As under `buildah run`: a helper named ``buildah-chroot-exec .../moondream-server`` runs the
    interpreter ``python .../moondream-server``; only the interpreter may get the SIGTERM (a signal to
    the helper kills the server outright)."""
    (tmp_path / "server").mkdir()
    server_script = tmp_path / "server" / "moondream-server"
    server_script.write_text("import time\ntime.sleep(30)\n")
    helper_script = tmp_path / "moondream-server"
    helper_script.write_text(
        "import subprocess\n"
        f"subprocess.run(['/opt/venv/bin/python', {str(server_script)!r}], executable={sys.executable!r})\n"
    )
    launcher = subprocess.Popen(
        ["buildah-chroot-exec", str(helper_script)], executable=sys.executable, start_new_session=True
    )
    try:
        found = None
        for _ in range(100):
            found = it.server_process(launcher.pid)
            if found is not None:
                break
            time.sleep(0.1)
        assert found is not None and found != launcher.pid
        argv = Path(f"/proc/{found}/cmdline").read_bytes().split(b"\0")
        assert argv[:2] == [b"/opt/venv/bin/python", str(server_script).encode()]
        assert it.process_uids(found) == [os.getuid(), os.geteuid(), os.getuid(), os.geteuid()]
    finally:
        os.killpg(launcher.pid, 9)
        launcher.wait(timeout=10)


def test_no_server_process_below_another_launcher() -> None:
    launcher = subprocess.Popen(["bash", "-c", "(sleep 30); true"], start_new_session=True)
    try:
        time.sleep(0.3)
        assert it.server_process(launcher.pid) is None
    finally:
        os.killpg(launcher.pid, 9)
        launcher.wait(timeout=10)
