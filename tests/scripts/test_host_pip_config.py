"""The host pip configuration handed to image builds: local paths moved under /mnt and mounted."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from scripts import host_pip_config as hpc


def host_tree(tmp_path: Path) -> Path:
    """A machine's pip files: a simple index, a wheel folder, a constraints file, a CA bundle."""
    (tmp_path / "pypi/simple/numpy").mkdir(parents=True)
    (tmp_path / "pypi/files").mkdir()
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (tmp_path / "more").mkdir()
    (tmp_path / "constraints.txt").write_text("torch<=2.14.1\n")
    (tmp_path / "ca.pem").write_text("cert\n")
    return tmp_path


def listing(root: Path) -> str:
    """What ``pip config list`` prints for such a machine (files plus PIP_* variables)."""
    return "\n".join(
        [
            f"global.constraint='{root}/constraints.txt'",
            f"global.cert='{root}/ca.pem'",
            f"global.extra-index-url='file://{root}/pypi/simple https://mirror.example/simple'",
            "global.find-links='/does/not/exist'",
            "install.find-links='/also/missing'",
            f":env:.find-links='{root}/wheels {root}/more'",
            ":env:.default-timeout='180'",
        ]
    )


def parsed(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def test_parse_config_list_reads_sections_and_quoted_values() -> None:
    sections = hpc.parse_config_list("global.cert='/a b'\n:env:.timeout='1'\nnot a setting\n")
    assert sections == {"global": {"cert": "/a b"}, ":env:": {"timeout": "1"}}


def test_environment_wins_over_every_file_section() -> None:
    merged = hpc.merge_env(
        {"global": {"find-links": "/a"}, "install": {"find-links": "/b"}, ":env:": {"find-links": "/c"}}
    )
    assert merged == {"global": {"find-links": "/c"}, "install": {"find-links": "/c"}}


def test_local_paths_move_under_mnt_and_are_mounted(tmp_path: Path) -> None:
    root = host_tree(tmp_path)
    config = hpc.for_build(hpc.parse_config_list(listing(root)))
    conf = parsed(config.conf_text())
    inside = f"/mnt{root}"
    assert conf["global"]["constraint"] == f"{inside}/constraints.txt"
    assert conf["global"]["cert"] == f"{inside}/ca.pem"
    # the index keeps its URL form; the remote mirror and missing paths pass through unchanged
    assert conf["global"]["extra-index-url"].split() == [
        f"file://{inside}/pypi/simple",
        "https://mirror.example/simple",
    ]
    assert conf["global"]["find-links"].split() == [f"{inside}/wheels", f"{inside}/more"]
    assert conf["global"]["default-timeout"] == "180"
    assert conf["install"]["find-links"].split() == [f"{inside}/wheels", f"{inside}/more"]
    # the index is served with its parent (its pages link to ../../files/...)
    assert dict(config.mounts) == {
        root / "pypi": f"{inside}/pypi",
        root / "wheels": f"{inside}/wheels",
        root / "more": f"{inside}/more",
        root / "constraints.txt": f"{inside}/constraints.txt",
        root / "ca.pem": f"{inside}/ca.pem",
    }
    assert not config.notes


def test_nested_paths_are_mounted_once(tmp_path: Path) -> None:
    root = host_tree(tmp_path)
    sections = {
        "global": {"find-links": f"{root}/pypi/files {root}/pypi", "constraint": f"{root}/pypi/c.txt"}
    }
    (root / "pypi/c.txt").write_text("")
    assert [host for host, _ in hpc.for_build(sections).mounts] == [root / "pypi"]


def test_find_links_holding_a_cpu_torch_can_be_left_out(tmp_path: Path) -> None:
    root = host_tree(tmp_path)
    config = hpc.for_build(hpc.parse_config_list(listing(root)), drop_find_links_with="torch-*+cpu*")
    conf = parsed(config.conf_text())
    assert conf["global"]["find-links"] == f"/mnt{root}/more"
    assert root / "wheels" not in dict(config.mounts)
    assert config.notes and str(root / "wheels") in config.notes[0]


def test_write_makes_the_mount_points_on_the_host_side(tmp_path: Path) -> None:
    root = host_tree(tmp_path / "host")
    config = hpc.for_build(hpc.parse_config_list(listing(root)))
    folder = tmp_path / "pip"
    conf = config.write(folder)
    assert parsed(conf.read_text()).has_section("global")
    assert (folder / str(root / "wheels").lstrip("/")).is_dir()
    assert (folder / str(root / "ca.pem").lstrip("/")).is_file()
    args = config.volume_args(folder)
    assert args[:2] == ["--volume", f"{folder}:/mnt:ro"]
    assert f"{root / 'wheels'}:/mnt{root / 'wheels'}:ro" in args


def test_the_build_configuration_works_for_pip(tmp_path: Path) -> None:
    """pip itself reads the written file through PIP_CONFIG_FILE and gets the moved paths."""
    root = host_tree(tmp_path / "host")
    conf = hpc.for_build(hpc.parse_config_list(listing(root))).write(tmp_path / "pip")

    def pip_config_get(name: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", name],
            env={"PIP_CONFIG_FILE": str(conf), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    assert pip_config_get("global.constraint") == f"/mnt{root}/constraints.txt"
    assert pip_config_get("global.find-links").split() == [f"/mnt{root}/wheels", f"/mnt{root}/more"]
