"""Fixtures of the deployment tests."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import DOCKERFILES, REPO, Dockerfile, parse_dockerfile


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(REPO / request.param)
