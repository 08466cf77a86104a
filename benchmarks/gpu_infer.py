"""GPU inference figures of the GPT-2-124M-shaped model, for an offline CUDA machine (`benchmarks/gpu.sh` runs it
after the training section). Installs and downloads nothing; transformers is optional (HF rows are skipped
without it). Random weights, so token-level agreement is checked, not quality.

Sections, each on its own (a failure prints its error and the next one runs), written to
$OUT/gpu_infer.json (or ./) after each:
  1. batch-1 decode, 32-token prompt, 128 new tokens, greedy: HF `generate` (sdpa, default cache) against ours
     (`generate_stream`, contiguous cache), fp32 and bf16 weights; tok/s and ratios;
  2. continuous batching: 64 requests (prompts 16–512, outputs 16–256, EOS ignored, all arriving at once)
     through `Engine` against HF padded static batches of 16; output tok/s.
  3. speculative decoding with the target as its own draft (α = 1): the verify cost of γ+1 tokens in one
     forward, the ceiling of any draft's speed-up on this device (trained draft/target pairs need checkpoints
     this script does not have).

    PYTHONPATH=. python benchmarks/gpu_infer.py [--device cuda] [--quick]
    PYTHONPATH=. python benchmarks/gpu_infer.py --device cpu --quick      # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.infer.speculative import speculative_generate  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402


def gpt2_config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=512, max_seq_len=1024, n_layer=2, d_model=128, n_head=4, position="learned",
                           ffn="gelu_tanh", norm="layernorm", init_std=0.1)  # fmt: skip
    return ModelConfig(vocab_size=50257, max_seq_len=1024, n_layer=12, d_model=768, n_head=12, position="learned",
                       ffn="gelu_tanh", norm="layernorm", init_std=0.1)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def hf_model(model: Transformer):
    try:
        from lmforge.model.hf_export import to_hf
    except Exception:
        return None
    try:
        return to_hf(model).eval()
    except Exception:
        return None


def decode_section(cfg, device, n_new, repeats) -> dict:
    out = {}
    prompt = torch.randint(cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Transformer(cfg).to(device=device, dtype=dtype).eval()
        name = str(dtype).removeprefix("torch.")
        ours = timed(lambda m=model: generate(m, prompt, max_new_tokens=n_new, temperature=0), device, repeats)
        row = {"ours_tok_s": n_new / ours}
        hf = hf_model(model)
        if hf is not None:
            ids = torch.tensor([prompt], device=device)

            def run_hf(hf=hf, ids=ids):
                hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)

            t = timed(run_hf, device, repeats)
            row.update(hf_tok_s=n_new / t, ours_vs_hf=t / ours)
        out[name] = row
        print(f"decode {name}: {row}", flush=True)
    return out


def workload(cfg, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(cfg.vocab_size, (int(torch.randint(16, 513, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]  # fmt: skip
    outputs = [int(torch.randint(16, 257, (1,), generator=g)) for _ in range(n)]
    return prompts, outputs


def batching_section(cfg, device, n_requests) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=torch.bfloat16 if device != "cpu" else torch.float32).eval()
    prompts, outputs = workload(cfg, n_requests)
    total = sum(outputs)
    engine = Engine(model, kv_memory_gib=8.0 if device != "cpu" else 0.5, verbose=True)
    params = [SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True) for o in outputs]
    sync(device)
    start = time.perf_counter()
    engine.generate(prompts, params)
    sync(device)
    ours = time.perf_counter() - start
    result = {"ours_tok_s": total / ours, "ours_s": ours, "max_running": engine.stats.max_running}
    hf = hf_model(model)
    if hf is not None:
        start = time.perf_counter()
        for i in range(0, n_requests, 16):
            group, longest = prompts[i : i + 16], max(outputs[i : i + 16])
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                        pad_token_id=0)  # fmt: skip
        sync(device)
        hf_s = time.perf_counter() - start
        result.update(hf_static16_tok_s=total / hf_s, ours_vs_hf_static16=hf_s / ours)
    print(f"batching: {result}", flush=True)
    return result


def speculative_section(cfg, device, n_new, repeats) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=torch.bfloat16 if device != "cpu" else torch.float32).eval()
    prompt = torch.randint(cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(temperature=0, max_new_tokens=n_new)
    base = timed(lambda: list(speculative_generate(model, prompt, greedy)), device, repeats)
    result = {}
    for gamma in (2, 4, 8):
        t = timed(lambda g=gamma: list(speculative_generate(model, prompt, greedy, draft=model, gamma=g)), device,
                  repeats)  # fmt: skip
        # With α = 1 each step emits γ+1 tokens for γ draft steps + 1 verify: the verify cost follows.
        result[f"gamma_{gamma}"] = {"speedup_self_draft": base / t}
    print(f"speculative (self-draft, α = 1): {result}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model and workload: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    out_path = args.out or Path(os.environ.get("OUT") or ".") / "gpu_infer.json"
    cfg = gpt2_config(args.quick)
    n_new, repeats, n_requests = (16, 2, 8) if args.quick else (128, 5, 64)
    results: dict = {"device": args.device, "quick": args.quick}
    sections = [("decode", lambda: decode_section(cfg, args.device, n_new, repeats)),
                ("batching", lambda: batching_section(cfg, args.device, n_requests)),
                ("speculative", lambda: speculative_section(cfg, args.device, n_new, repeats))]  # fmt: skip
    for name, fn in sections:
        try:
            results[name] = fn()
        except Exception as e:  # one broken section must not hide the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        out_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
