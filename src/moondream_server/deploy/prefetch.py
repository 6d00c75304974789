"""Download the model into the Hugging Face cache ahead of time ("bake" it).

``python -m moondream_server.deploy.prefetch`` fetches what the server will load for its settings
(``MOONDREAM_MODEL`` / ``MOONDREAM_REVISION``, defaults ``vikhyatk/moondream2`` @ ``2025-06-21``): the
weights, the config and the tokenizer (``moondream/starmie-v1``), into the cache at ``HF_HOME`` (or
``HF_HUB_CACHE``), exactly where the server looks at start-up, because it asks the server's own
resolver (:func:`moondream_server.model.hub.resolve`). Run it at image build time
(``--build-arg BAKE_MODEL=true``) or on a connected machine whose cache is then copied to an
air-gapped site; start the server there with ``HF_HUB_OFFLINE=1``.

A local checkpoint folder needs nothing: its files are checked and listed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moondream_server.model.hub import ModelFiles, ModelLoadError, resolve
from moondream_server.settings import Settings


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (``MOONDREAM_*``), with ``overrides`` on top."""
    return Settings(**overrides)


def prefetch(model: str, revision: str | None, tokenizer: str | None = None) -> ModelFiles:
    """Make sure every file the server needs for ``model`` is local; return where they are."""
    return resolve(model, revision, tokenizer)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description="Download the Moondream2 model into the HF cache.")
    parser.add_argument("--model", default=settings.model, help=f"repo id or folder ({settings.model})")
    parser.add_argument("--revision", default=settings.revision, help=f"Hub revision ({settings.revision})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer repo/file (default: the model's)")
    args = parser.parse_args(argv)
    try:
        files = prefetch(args.model, args.revision, args.tokenizer)
    except ModelLoadError as exc:
        print(f"prefetch failed: {exc}", file=sys.stderr)
        return 1
    for what, path in (("weights", files.weights), ("config", files.config), ("tokenizer", files.tokenizer)):
        if path is not None:
            print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
