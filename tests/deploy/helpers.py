"""Shared helpers for the deployment tests: repository paths and a small Dockerfile reader."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def args(self) -> dict[str, str]:
        """Every ARG default, global and per stage."""
        out = dict(self.global_args)
        for stage in self.stages:
            for arg in stage.all("ARG"):
                name, _, default = arg.partition("=")
                out[name.strip()] = default.strip()
        return out

    def env(self, stage: Stage) -> dict[str, str]:
        """ENV key=value pairs of ``stage`` (values unquoted, not expanded)."""
        out: dict[str, str] = {}
        for env in stage.all("ENV"):
            for token in shlex.split(env):
                key, sep, value = token.partition("=")
                assert sep, f"{self.path.name}: use ENV key=value, got {env!r}"
                out[key] = value
        return out

    def run_commands(self) -> list[str]:
        """Every shell command of every RUN, split at ``&&``, whitespace normalised."""
        out = []
        for stage in self.stages:
            for run in stage.all("RUN"):
                out += [" ".join(part.split()) for part in run.split("&&")]
        return out


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"{path.name}: cannot read FROM {rest!r}"
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may precede the first FROM"
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(path=path, global_args=global_args, stages=stages)
