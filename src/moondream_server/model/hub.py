"""Where model files come from: a local folder, or the Hugging Face Hub (cached, pinned)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "vikhyatk/moondream2"
DEFAULT_REVISION = "2025-06-21"
# The model repo ships a stale GPT-2 tokenizer.json; the 2025-06-21 code loads this one instead.
DEFAULT_TOKENIZER = "moondream/starmie-v1"


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    weights: Path
    config: Path | None
    tokenizer: Path
    model_id: str
    revision: str | None


def _is_native_config(path: Path) -> bool:
    """True for a config in the shape of config_md2.json; False for the HF wrapper's config.json."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    return isinstance(data, dict) and any(k in data for k in ("text", "vision", "region"))


def resolve(
    source: str | os.PathLike[str], revision: str | None = None, tokenizer: str | None = None
) -> ModelFiles:
    """Find weights, config and tokenizer for `source` (a folder or a Hub repo id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path, tokenizer)
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {source} does not exist or is not a folder")
    return _from_hub(str(source), revision, tokenizer)


def _from_folder(path: Path, tokenizer: str | None) -> ModelFiles:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{path} has no model.safetensors (expected the official weight file there)")
    config: Path | None = path / "config.json"
    native = config is not None and config.is_file() and _is_native_config(config)
    if not native:
        config = None
    if tokenizer is not None:
        tok = _tokenizer_path(tokenizer)
    elif (path / "tokenizer.json").is_file() and (native or not (path / "config.json").is_file()):
        tok = path / "tokenizer.json"
    else:
        # An HF snapshot of vikhyatk/moondream2: its own tokenizer.json is the wrong one.
        tok = _tokenizer_path(DEFAULT_TOKENIZER)
    return ModelFiles(weights=weights, config=config, tokenizer=tok, model_id=str(path), revision=None)


def _tokenizer_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        return path / "tokenizer.json"
    return _download(source, "tokenizer.json", None)


def _from_hub(repo_id: str, revision: str | None, tokenizer: str | None) -> ModelFiles:
    if revision is None and repo_id == DEFAULT_MODEL:
        revision = DEFAULT_REVISION
    weights = _download(repo_id, "model.safetensors", revision)
    config_path = _download(repo_id, "config.json", revision, required=False)
    config = config_path if config_path is not None and _is_native_config(config_path) else None
    tok = _tokenizer_path(tokenizer or DEFAULT_TOKENIZER)
    return ModelFiles(weights=weights, config=config, tokenizer=tok, model_id=repo_id, revision=revision)


def _download(repo_id: str, filename: str, revision: str | None, *, required: bool = True) -> Path:
    # Imported here so that purely local use never touches the hub client.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    # LocalEntryNotFoundError subclasses EntryNotFoundError in newer huggingface_hub: test it first.
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "offline mode is on (HF_HUB_OFFLINE) and the file is not in the cache"
            if offline
            else ("the Hugging Face Hub could not be reached and the file is not in the cache")
        )
        raise ModelLoadError(
            f"cannot get {filename} of {repo_id}@{revision or 'main'}: {why}. Fix: connect to the network "
            f"(or set HTTPS_PROXY) and start again to download it once, or download it elsewhere with "
            f"`huggingface-cli download {repo_id} --revision {revision or 'main'}` and copy the cache "
            f"(HF_HOME), or pass a local folder with --model /path/to/folder."
        ) from e
    except EntryNotFoundError:
        if required:
            raise ModelLoadError(f"{repo_id}@{revision or 'main'} has no file {filename}") from None
        return None  # type: ignore[return-value]
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the Hub refused {filename} of {repo_id}@{revision or 'main'}: {e}") from e
