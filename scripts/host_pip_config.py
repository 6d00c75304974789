"""This machine's pip configuration, carried into a container build without being baked into the image.

A build on a machine whose pip reads local wheel folders, local simple indexes or a constraints file
(``pip config list`` shows them) needs those files inside each ``RUN pip install`` step. This module
turns the effective configuration into

* one ``pip.conf`` in which every local path is moved under ``MOUNT_ROOT`` (``/mnt``), and
* the read-only bind mounts that put the host's files at those paths.

The builder (``buildah bud --volume``) mounts the folder holding that ``pip.conf`` on ``/mnt`` and the
local paths below it; the Dockerfiles read the file only through their build-stage ``ARG
PIP_CONFIG_FILE``. ``/mnt`` already exists (empty) in Debian-based images, so no mount point is left
behind in any layer, and the runtime stage copies nothing but the virtualenv.
"""

from __future__ import annotations

import ast
import configparser
import io
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Where the build sees this machine's pip files (exists and is empty in Debian-based images).
MOUNT_ROOT = "/mnt"
#: The configuration file's name inside MOUNT_ROOT.
CONF_NAME = "pip.conf"
#: Keys whose value is a list of simple-index URLs (their HTML may link to ``../../files/...``).
INDEX_KEYS = frozenset({"index-url", "extra-index-url"})
#: ``pip config list`` names the settings that come from ``PIP_*`` environment variables so.
ENV_SECTION = ":env:"


@dataclass
class BuildPipConfig:
    """A pip configuration for a container build and the host paths it needs."""

    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    #: (host path, path inside the build), read-only bind mounts, outermost first.
    mounts: list[tuple[Path, str]] = field(default_factory=list)
    #: Human-readable notes about what was left out, for the build log.
    notes: list[str] = field(default_factory=list)

    def conf_text(self) -> str:
        parser = configparser.ConfigParser(interpolation=None)
        for section, values in self.sections.items():
            parser[section] = values
        out = io.StringIO()
        parser.write(out)
        return out.getvalue()

    def write(self, folder: Path) -> Path:
        """Write ``pip.conf`` into ``folder`` and create the mount points below it.

        ``folder`` is mounted on MOUNT_ROOT; each host path is mounted on a directory or an empty file
        inside it, created here on the host so that the builder never creates one in the image.
        """
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / CONF_NAME
        conf.write_text(self.conf_text(), encoding="utf-8")
        for host, inside in self.mounts:
            target = folder / Path(inside).relative_to(MOUNT_ROOT)
            if host.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
        return conf

    def volume_args(self, folder: Path) -> list[str]:
        """``buildah bud`` arguments: the folder on MOUNT_ROOT first, then each host path."""
        args = ["--volume", f"{folder}:{MOUNT_ROOT}:ro"]
        for host, inside in self.mounts:
            args += ["--volume", f"{host}:{inside}:ro"]
        return args


def parse_config_list(text: str) -> dict[str, dict[str, str]]:
    """Parse ``pip config list`` output (``section.key='value'`` lines) into sections."""
    sections: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if "=" not in line or "." not in line.split("=", 1)[0]:
            continue
        name, raw = line.split("=", 1)
        section, key = name.rsplit(".", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        sections.setdefault(section, {})[key] = str(value)
    return sections


def read_host_config(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """The effective configuration of ``python -m pip`` here (files and ``PIP_*`` variables)."""
    result = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False, timeout=60
    )
    return parse_config_list(result.stdout) if result.returncode == 0 else {}


def merge_env(sections: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Fold the ``PIP_*`` settings into the file sections with the precedence pip gives them.

    pip lets an environment variable win over every file section, so it goes into ``[global]`` and
    replaces the same key in any command section (``[install]``...).
    """
    env = sections.get(ENV_SECTION, {})
    out = {name: dict(values) for name, values in sections.items() if name != ENV_SECTION}
    out.setdefault("global", {})
    for key, value in env.items():
        for values in out.values():
            if key in values:
                values[key] = value
        out["global"][key] = value
    return out


def _local_path(token: str) -> Path | None:
    if token.startswith("file:"):
        return Path(unquote(urlparse(token).path))
    if token.startswith("/"):
        return Path(token)
    return None


def _inside(path: Path) -> str:
    return MOUNT_ROOT + str(path)


def for_build(
    sections: dict[str, dict[str, str]], *, drop_find_links_with: str | None = None
) -> BuildPipConfig:
    """Move every local path of ``sections`` under MOUNT_ROOT and list the mounts that serve them.

    ``drop_find_links_with``: leave out ``find-links`` folders holding a file that matches this glob
    (the CUDA image: a local ``torch-*+cpu*`` wheel would win over PyPI's CUDA build, because
    ``2.13.0+cpu`` sorts above ``2.13.0`` and matches ``torch==2.13.0``).
    """
    merged = merge_env(sections)
    config = BuildPipConfig()
    wanted: set[Path] = set()
    for section, values in merged.items():
        out: dict[str, str] = {}
        for key, value in values.items():
            tokens = []
            for token in value.split():
                path = _local_path(token)
                if path is None or not path.exists():
                    tokens.append(token)
                    continue
                if (
                    key == "find-links"
                    and drop_find_links_with
                    and path.is_dir()
                    and any(path.glob(drop_find_links_with))
                ):
                    config.notes.append(f"left out find-links {path} (it holds {drop_find_links_with})")
                    continue
                # A simple index links its files relative to itself; serve its parent folder too.
                wanted.add(path.parent if key in INDEX_KEYS and path.name == "simple" else path)
                moved = _inside(path)
                tokens.append(f"file://{moved}" if token.startswith("file:") else moved)
            if tokens:
                out[key] = "\n".join(tokens) if len(tokens) > 1 else tokens[0]
        config.sections[section] = out
    config.mounts = [(p, _inside(p)) for p in _outermost(wanted)]
    return config


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The paths not below another one, sorted so that a parent would come before its children."""
    resolved = sorted(set(paths), key=lambda p: (len(p.parts), str(p)))
    kept: list[Path] = []
    for path in resolved:
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


def main() -> int:
    """Print the build configuration for this machine (a debugging aid)."""
    config = for_build(read_host_config())
    sys.stdout.write(config.conf_text())
    for host, inside in config.mounts:
        print(f"# mount {host} -> {inside} (ro)")
    for note in config.notes:
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
