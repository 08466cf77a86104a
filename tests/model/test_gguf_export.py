"""GGUF export (lmforge/model/gguf_export.py) read back by outside readers: transformers (`gguf_file=`) gives the
source model's logits (f32: ≤1e-4), and the values it reads from f16 and q8_0 files equal lmforge's own reader's;
llama.cpp's llama-server, where a build is found (benchmarks/llama_cpp.py), generates the source's greedy tokens.
What llama.cpp's llama architecture cannot express is refused in one line."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import UserError  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.model.gguf import from_gguf  # noqa: E402
from lmforge.model.gguf_export import save_gguf  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

TEXT = "def parse(text):\n    return [line.split() for line in text.splitlines() if line]\n" * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([TEXT], 320)


def llama_like(tok, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, max_seq_len=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
               position="rope", ffn="swiglu", norm="rmsnorm", bias=False, init_std=0.1) | kw  # fmt: skip
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_f32_export_gives_the_source_logits_in_transformers(tok, tmp_path, tied):
    model = llama_like(tok, tie_embeddings=tied)
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    idx = torch.tensor([tok.encode("def parse(text): return")])
    with torch.no_grad():
        ours = model(idx)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        theirs = hf(idx).logits
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= 1e-4
    assert torch.equal(from_gguf(path)(idx), ours)  # lmforge's reader undoes the q/k permutation exactly
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("quantize", ["f16", "q8_0"])
def test_f16_and_q8_0_files_read_the_same_in_transformers_and_lmforge(tok, tmp_path, quantize):
    model = llama_like(tok)
    path = save_gguf(model, tok, tmp_path / f"m-{quantize}.gguf", quantize)
    idx = torch.tensor([tok.encode("return line")])
    with torch.no_grad():
        ours = from_gguf(path)(idx)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()(idx).logits
        source = model(idx)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert 0 < ((ours - source).abs().max() / source.abs().max()).item() < 0.05  # quantized: close, not equal
    f32 = save_gguf(model, tok, tmp_path / "m-f32.gguf")
    assert path.stat().st_size < 0.6 * f32.stat().st_size


def test_what_llama_cpp_cannot_express_is_refused_in_one_line(tok, tmp_path):
    with pytest.raises(UserError, match="position='learned'"):
        save_gguf(llama_like(tok, position="learned"), tok, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="qk_norm"):
        save_gguf(llama_like(tok, qk_norm="head"), tok, tmp_path / "b.gguf")
    chars = Tokenizer.train_char([TEXT])
    with pytest.raises(UserError, match="byte-level BPE"):
        save_gguf(llama_like(chars), chars, tmp_path / "c.gguf")
    with pytest.raises(UserError, match="--quantize"):
        save_gguf(llama_like(tok), tok, tmp_path / "d.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def test_llama_server_generates_the_source_greedy_tokens(tok, tmp_path):
    from benchmarks import llama_cpp
    from benchmarks.serving import free_port, wait_healthy
    from lmforge.infer.generate import generate_stream
    from lmforge.infer.sampling import SamplingParams

    bin_dir = llama_cpp.find(need="llama-server")
    if isinstance(bin_dir, str):
        pytest.skip(bin_dir)
    model = llama_like(tok)
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    prompt = tok.encode("def parse(text):")
    ours = list(generate_stream(model, prompt, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)))
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(path), "--port", str(port), "-t", "2", "-c", "64", "--no-webui"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, "llama-server", timeout=60)
        body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "top_k": 1, "ignore_eos": True,
                "return_tokens": True, "cache_prompt": False}  # fmt: skip
        answer = httpx.post(f"{url}/completion", json=body, timeout=60).json()
        assert answer["tokens"] == ours, json.dumps(answer)[:300]
        text = "def parse(text):\n    return 123 + line.split()  # ok"
        split = httpx.post(f"{url}/tokenize", json={"content": text}, timeout=10).json()["tokens"]
        assert split == tok.encode(text)  # llama.cpp splits text as the tokenizer does (tokenizer.ggml.pre)
    finally:
        server.terminate()
        server.wait(10)


def test_export_command_writes_a_gguf_and_refuses_to_overwrite_it(tok, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model.hf_export import save_hf

    model = llama_like(tok)
    folder = save_hf(model, tmp_path / "hf")
    tok.save(folder)
    out = tmp_path / "m.gguf"
    assert main(["export", "--to", "gguf", str(folder), "--out", str(out), "--quantize", "q8_0"]) == 0
    size = out.stat().st_size
    assert main(["export", "--to", "gguf", str(folder), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.stat().st_size == size  # the user's file is untouched
    assert main(["export", "--to", "gguf", str(folder), "--out", str(out), "--overwrite"]) == 0
    assert out.stat().st_size > size  # f32 now
