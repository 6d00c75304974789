"""Loading from folders and from a Hugging Face cache, and the errors bad folders give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moondream_server.model import ModelLoadError, Moondream, MoondreamConfig, load
from moondream_server.model.hub import DEFAULT_MODEL, DEFAULT_REVISION, DEFAULT_TOKENIZER
from moondream_server.model.layers import MLP
from moondream_server.model.loading import resolve_dtype
from moondream_server.model.text import TextBlock
from tests.model.support import TINY, TOKENIZER, mapped_kib


def _mlp(model: Moondream) -> MLP:
    block = model.net.text.blocks[0]
    assert isinstance(block, TextBlock)
    return block.mlp


def test_loads_our_random_checkpoint_with_exact_weights(random_folder: Path) -> None:
    model = load(random_folder, device="cpu", dtype=torch.float32, cpu_weights="float32")
    stored = load_file(str(random_folder / "model.safetensors"))
    assert len(stored) == 72 and all(k.startswith("model.") for k in stored)
    params = dict(model.net.named_parameters())
    for key, tensor in stored.items():
        assert torch.equal(params[key.removeprefix("model.")], tensor.float()), key


def test_cpu_float16_weight_storage_is_exact_for_bf16_checkpoints(random_folder: Path) -> None:
    """The default on CPU float32: linear weights held as float16 (bf16 values fit exactly)."""
    from moondream_server.model.layers import Fp16Linear

    plain = load(random_folder, device="cpu", dtype=torch.float32, cpu_weights="float32")
    packed = load(random_folder, device="cpu", dtype=torch.float32)
    assert isinstance(_mlp(packed).fc1, Fp16Linear)
    assert isinstance(_mlp(plain).fc1, torch.nn.Linear)
    x = torch.randn(5, plain.config.text.dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_mlp(packed).fc1(x), _mlp(plain).fc1(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cpu_weights"):
        load(random_folder, device="cpu", dtype=torch.float32, cpu_weights="int4")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_float32_load_packs_layers_after_it_returns_and_lets_their_pages_go(
    tmp_path: Path, random_folder: Path
) -> None:
    """Every linear layer is packed in the background, the text and region models' first (decode
    steps gain the most), each letting go of the checkpoint's pages behind it."""
    from moondream_server.model.layers import Fp16Linear

    folder = _copy(random_folder, tmp_path / "m")  # mapped by this test alone
    model = load(folder, device="cpu", dtype=torch.float32)
    assert model.packing is not None and model.wait_packed(timeout=60)
    names = {id(m): name for name, m in model.net.named_modules() if isinstance(m, Fp16Linear)}
    order = [names[id(m)].startswith("vision.") for m in model.packing._layers]
    assert order == sorted(order) and any(order) and not all(order)  # text and region, then vision
    assert model.packing.packed == model.packing.total == len(names)
    stored = len(load_file(str(folder / "model.safetensors")))
    pages = 4 * (1 + 2 * stored)  # KiB: the header's page and one at each end of every tensor
    linear_kib = sum(m.in_features * m.out_features * 2 for m in model.packing._layers) // 1024
    assert linear_kib > 2 * pages  # so the bound below catches layers that keep their pages
    assert mapped_kib(folder / "model.safetensors") <= pages
    plain = load(folder, device="cpu", dtype=torch.float32, cpu_weights="float32")
    image = Image.new("RGB", (64, 48), (200, 40, 90))
    settings = {"max_tokens": 8, "temperature": 0.0}
    assert model.caption(image, settings=settings) == plain.caption(image, settings=settings)


def test_layers_float16_cannot_hold_stay_unpacked_and_exact(tmp_path: Path, random_folder: Path) -> None:
    """Loading holds linear weights in the file's dtype (bf16) and packs them as float16 after
    load; a layer with a weight float16 cannot hold (beyond its 65504 range) is never packed and
    keeps multiplying by its bf16 values widened to float32."""
    from moondream_server.model.layers import Fp16Linear

    folder = _copy(random_folder, tmp_path / "big")
    state = load_file(str(folder / "model.safetensors"))
    key = "model.text.blocks.0.mlp.fc1.weight"
    assert state[key].dtype == torch.bfloat16
    state[key][0, 0] = 1e5
    save_file(state, str(folder / "model.safetensors"))
    model = load(folder, device="cpu", dtype=torch.float32)
    assert model.wait_packed(timeout=60)
    fc1, fc2 = _mlp(model).fc1, _mlp(model).fc2
    assert isinstance(fc1, Fp16Linear) and not fc1.packed
    assert isinstance(fc2, Fp16Linear) and fc2.packed
    x = torch.randn(3, fc1.in_features, generator=torch.Generator().manual_seed(0))
    bias = state[key.replace("weight", "bias")].float()
    torch.testing.assert_close(fc1(x), torch.nn.functional.linear(x, state[key].float(), bias))
    assert torch.isfinite(fc1(x)).all()  # float16 would have made the 1e5 an infinity
    assert {p.dtype for p in model.net.parameters()} == {torch.float32}


def test_bf16_load_keeps_stored_bf16_values(random_folder: Path) -> None:
    model = load(random_folder, device="cpu", dtype="bfloat16")
    stored = load_file(str(random_folder / "model.safetensors"))
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.net.text.wte, stored["model.text.wte"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weights_file_is_named(tmp_path: Path, random_folder: Path) -> None:
    folder = _copy(random_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load(folder, device="cpu")


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope", device="cpu")


def test_wrong_shapes_name_the_tensor(tmp_path: Path, random_folder: Path) -> None:
    folder = _copy(random_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text"]["ff_dim"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model\.text\.blocks\.0\.mlp\.fc1\.(weight|bias) has shape"):
        load(folder, device="cpu")


def test_wrong_keys_are_listed(tmp_path: Path, random_folder: Path) -> None:
    folder = _copy(random_folder, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["model.text.lm_head.weights"] = state.pop("model.text.lm_head.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        ModelLoadError, match=r"missing 1 tensors \(e\.g\. model\.text\.lm_head\.weight\).*unexpected"
    ):
        load(folder, device="cpu")


def test_corrupt_weights_file(tmp_path: Path, random_folder: Path) -> None:
    folder = _copy(random_folder, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load(folder, device="cpu")


def test_unknown_config_key_is_rejected(tmp_path: Path, random_folder: Path) -> None:
    folder = _copy(random_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text"]["n_layer"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_layer"):
        load(folder, device="cpu")


def test_config_defaults_are_the_real_model() -> None:
    c = MoondreamConfig()
    assert (c.text.dim, c.text.n_layers, c.text.n_heads, c.text.vocab_size) == (2048, 24, 32, 51200)
    assert (c.vision.enc_dim, c.vision.enc_n_layers, c.vision.grid, c.vision.max_crops) == (1152, 27, 27, 12)
    assert c.tokenizer.templates["query"]["prefix"] == [1, 15381, 2]


def test_dtype_auto_follows_device_and_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import moondream_server.model.loading as loading

    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def _hub_cache(root: Path, repo: str, revision: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: refs/<rev> -> commit, snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / revision).write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, snap / name)


def _hf_config(path: Path) -> Path:
    """The transformers wrapper config.json the real repo ships (its model config is empty)."""
    path.write_text(json.dumps({"architectures": ["HfMoondream"], "model_type": "moondream1", "config": {}}))
    return path


def test_default_source_is_pinned_hub_repo_and_starmie_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_folder: Path
) -> None:
    """The real download path, stopped before the network: an offline Hub cache laid out by hand."""
    cache = tmp_path / "hub"
    _hub_cache(
        cache,
        DEFAULT_MODEL,
        DEFAULT_REVISION,
        {
            "model.safetensors": random_folder / "model.safetensors",
            "config.json": _hf_config(tmp_path / "c.json"),
        },
    )
    _hub_cache(cache, DEFAULT_TOKENIZER, "main", {"tokenizer.json": TOKENIZER})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from moondream_server.model.hub import resolve

    files = resolve(DEFAULT_MODEL)
    assert files.revision == DEFAULT_REVISION
    assert files.config is None  # wrapper config: the real model's defaults apply
    assert files.weights.parent.name == "0123456789abcdef0123456789abcdef01234567"
    assert "starmie" in str(files.tokenizer)


def test_offline_without_cache_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE.*--model /path/to/folder"):
        load(DEFAULT_MODEL, device="cpu")


def test_hf_snapshot_folder_does_not_use_its_stale_tokenizer(tmp_path: Path, random_folder: Path) -> None:
    """A local copy of the HF repo has a GPT-2 tokenizer.json; the model needs Starmie instead."""
    folder = _copy(random_folder, tmp_path / "snap")
    _hf_config(folder / "config.json")
    from moondream_server.model.hub import resolve

    files = resolve(folder, tokenizer=str(TOKENIZER))
    assert files.tokenizer == TOKENIZER and files.config is None


def test_golden_checkpoint_loads_and_runs() -> None:
    model = load(TINY, device="cpu", dtype="float32")
    out = model.point(Image.new("RGB", (32, 32), "white"), "dot", settings={"max_objects": 1})
    assert len(out["points"]) <= 1
