"""The planner behind `lmforge plan`: from a compute budget, a model size or a model config to the model size and
tokens the budget buys, the FLOPs, time and cost on given accelerators, the training memory per rank, and the
serving memory with the largest batch × context that fits. Arithmetic from estimate.py and laws.py.

    lmforge plan --compute 1e20                                   # size and tokens for a budget, time on one H100
    lmforge plan --model-config configs/pretrain/small.yaml --tokens 10e9 --gpu a100 --gpus 8 --price 1.8
    lmforge plan --params 13e9 --tokens 260e9 --compute 1e20      # what a 13B / 260B run really needs
    lmforge plan --kv-example                                     # 128K × 1024 × 40 × 2, in bytes

    from lmforge.scaling.plan import PlanOptions, make_plan, render
    print(render(make_plan(PlanOptions(compute=1e20))))

Run the checks: pytest tests/scaling/test_plan.py
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.hardware import dtype_bytes, quant_bytes_per_weight

from . import estimate as est


@dataclass
class PlanOptions:
    compute: float | None = None  # FLOPs budget
    model_config: str | None = None  # a ModelConfig YAML, or a recipe with a `model:` section
    vocab_size: int | None = None  # replaces the config's (recipes take it from their data)
    params: float | None = None  # N, all parameters (instead of a model config)
    tokens: float | None = None  # D
    tokens_per_param: float = est.TOKENS_PER_PARAM
    law: str = "hoffmann"  # hoffmann | epoch | a fit JSON from `lmforge scaling fit`
    gpu: str = "h100"
    gpus: int = 1
    mfu: float = 0.4
    price: float | None = None  # per accelerator-hour
    peak_tflops: float | None = None
    memory_gib: float | None = None
    precision: str = "bf16"  # training: fp32, or bf16/fp16 autocast
    checkpointing: bool = False
    fsdp_ranks: int | None = None  # None: data parallel (replicated weights, gradients, Adam)
    micro_batch: int = 1
    seq_len: int | None = None  # None: the config's max_seq_len
    grad_accumulation: int = 1
    dtype: str = "bf16"  # serving dtype of weights not quantized
    quantize: str | None = None  # int8 | w8a8 | int4 | bf16 (lmforge.infer.quantize)
    group_size: int = 64
    kv_dtype: str | None = None  # None: = dtype
    context: int | None = None  # None: the config's max_seq_len
    batch: int = 1
    reserve: float = 0.1
    serve_gpus: int = 1
    kv_example: bool = False


def load_model_config(path: str | Path, vocab_size: int | None = None):
    """A ModelConfig from a YAML file holding one, or a recipe (configs/pretrain/*.yaml) with a `model:` key."""
    import yaml

    from lmforge.config import from_dict
    from lmforge.model.config import ModelConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of ModelConfig fields (or a recipe with a model: key)")
    data = dict(data.get("model", data))
    if vocab_size is not None:
        data["vocab_size"] = vocab_size
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.key) from None


def resolve_law(spec: str):
    """("hoffmann" | "epoch" | a fit file's name, its ChinchillaLaw)."""
    from .laws import EPOCH, HOFFMANN, load_law

    named = {"hoffmann": HOFFMANN, "epoch": EPOCH}
    if spec.lower() in named:
        return spec.lower(), named[spec.lower()]
    return str(spec), load_law(spec)


def _check(o: PlanOptions) -> None:
    """The numbers a user gives, each with a one-line message (the estimators check the rest)."""
    if o.params is not None and o.model_config is not None:
        raise ConfigError("give --params or --model-config, not both")
    positive = {"compute": o.compute, "params": o.params, "tokens": o.tokens, "tokens-per-param": o.tokens_per_param,
                "gpus": o.gpus, "mfu": o.mfu, "price": o.price, "micro-batch": o.micro_batch, "batch": o.batch,
                "serve-gpus": o.serve_gpus, "grad-accumulation": o.grad_accumulation, "fsdp-ranks": o.fsdp_ranks,
                "seq-len": o.seq_len, "context": o.context, "group-size": o.group_size,
                "peak-tflops": o.peak_tflops, "memory-gib": o.memory_gib}  # fmt: skip
    for name, value in positive.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{name} must be a positive number, got {value}")
    if not 0 <= o.reserve < 1:
        raise ConfigError(f"--reserve is a fraction of memory in [0, 1), got {o.reserve}")
    if o.mfu > 1:
        raise ConfigError(f"--mfu is a fraction of peak (0.4 = 40%), got {o.mfu}")


def make_plan(o: PlanOptions) -> dict:
    """Every figure of the plan as plain JSON-able numbers (bytes, FLOPs, hours); `render` prints it."""
    _check(o)
    if o.compute is None and o.params is None and o.model_config is None and not o.kv_example:
        raise ConfigError("nothing to plan: give --compute FLOPs, --params N or --model-config PATH (or --kv-example)")
    plan: dict = {"options": asdict(o)}
    if o.kv_example:
        example = est.kv_worked_example()
        plan["kv_example"] = asdict(example) | {"lines": example.lines()}
    if o.compute is None and o.params is None and o.model_config is None:
        return plan
    acc = est.accelerator(o.gpu, dtype=o.precision, peak_tflops=o.peak_tflops, memory_gib=o.memory_gib)
    plan["accelerator"] = {"name": acc.name, "dtype": o.precision, "peak_flops": acc.peak_flops,
                           "memory_bytes": acc.memory_bytes, "source": acc.source}  # fmt: skip
    if o.compute is not None:
        plan["budget"] = _budget_plan(o)

    cfg = load_model_config(o.model_config, o.vocab_size) if o.model_config else None
    if cfg is not None:
        seq_len = o.seq_len or cfg.max_seq_len
        counts = cfg.param_counts()
        n, fpt = counts["total"], cfg.flops_per_token(seq_len)
        plan["model"] = {"source": f"config {o.model_config}", "params": n, "flops_per_token": fpt,
                         "non_embedding_params": counts["non_embedding"], "seq_len": seq_len, "n_layer": cfg.n_layer,
                         "d_model": cfg.d_model, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
                         "vocab_size": cfg.vocab_size}  # fmt: skip
    else:
        seq_len = o.seq_len
        if o.params is not None:
            n, source = o.params, "--params"
        else:
            n, source = plan["budget"]["rule"]["params"], f"compute-optimal at {o.tokens_per_param:g} tokens/parameter"
        fpt = 6 * n
        plan["model"] = {"source": source, "params": n, "flops_per_token": fpt}

    if o.tokens is not None:
        tokens = o.tokens
    elif o.compute is not None:
        tokens = o.compute / fpt  # what the budget buys for this model
    else:
        tokens = o.tokens_per_param * n
    flops = est.training_flops(cfg, tokens, seq_len) if cfg is not None else est.flops_6nd(n, tokens)
    t = est.training_time(flops, acc, mfu=o.mfu, n_accelerators=o.gpus, price_per_hour=o.price)
    plan["training"] = {"tokens": tokens, "tokens_per_param": tokens / n, **asdict(t), "price_per_hour": o.price}
    if o.compute is not None:
        plan["training"]["of_budget"] = flops / o.compute
    plan["training_memory"] = _training_memory_plan(o, cfg, n, seq_len, acc)
    plan["serving"] = _serving_plan(o, cfg, n, acc)
    return plan


def _budget_plan(o: PlanOptions) -> dict:
    """The budget's model size and tokens by the r-tokens-per-parameter rule and by the law's frontier."""
    n_rule, d_rule = est.compute_optimal(o.compute, o.tokens_per_param)
    name, law = resolve_law(o.law)
    n_law, d_law = law.optimal(o.compute)
    return {
        "compute": o.compute,
        "rule": {"tokens_per_param": o.tokens_per_param, "params": n_rule, "tokens": d_rule},
        "law": {
            "name": name,
            "params": n_law,
            "tokens": d_law,
            "tokens_per_param": d_law / n_law,
            "loss": law.loss_at_compute(o.compute),
            "formula": str(law),
        },
    }


def _training_memory_plan(o: PlanOptions, cfg, n: float, seq_len: int | None, acc: est.Accelerator) -> dict:
    ranks, sharding = (o.fsdp_ranks, "fsdp") if o.fsdp_ranks else (o.gpus, "ddp")
    if cfg is not None:
        m = est.training_memory(cfg, micro_batch=o.micro_batch, seq_len=seq_len, precision=o.precision,
                                checkpointing=o.checkpointing, ranks=ranks, sharding=sharding,
                                grad_accumulation=o.grad_accumulation)  # fmt: skip
        mem = {k: v for k, v in m.to_dict().items() if k != "detail"}
        mem.update(ddp_buckets=m.detail["ddp_buckets"], fsdp_gathered=m.detail["fsdp_gathered"])
        mem["korthikanti_activations"] = est.korthikanti_activation_bytes(
            seq_len, o.micro_batch, cfg.d_model, cfg.n_head, cfg.n_layer, "full" if o.checkpointing else "none"
        )
    else:  # no shapes: only the 16 bytes per parameter (4 weights + 4 gradients + 8 Adam moments)
        share = ranks if sharding == "fsdp" else 1
        buckets = 4 * n if sharding == "ddp" and ranks > 1 else 0  # DDP's bucket copy of the gradients
        mem = {"weights": 4 * n / share, "gradients": 4 * n / share + buckets, "optimizer": 8 * n / share}
        mem.update(total=sum(mem.values()), activations=None, ddp_buckets=buckets)
    return mem | {"sharding": sharding, "ranks": ranks, "fits": mem["total"] <= acc.memory_bytes}


def _serving_plan(o: PlanOptions, cfg, n: float, acc: est.Accelerator) -> dict:
    if cfg is not None:
        context = o.context or cfg.max_seq_len
        s = est.serving_memory(cfg, acc.memory_bytes, context=context, batch=o.batch, dtype=o.dtype,
                               quantize=o.quantize, kv_dtype=o.kv_dtype, group_size=o.group_size,
                               reserve=o.reserve, shards=o.serve_gpus)  # fmt: skip
        out = {"context": context, "batch": o.batch, **s.to_dict()}
    else:
        weights = n * _bytes_per_weight(o) / o.serve_gpus
        usable = acc.memory_bytes * (1 - o.reserve)
        out = {"weights": weights, "usable": usable, "fits": weights <= usable, "kv_per_token": None,
               "note": "needs --model-config (shapes)"}  # fmt: skip
    return out | {"dtype": o.dtype, "quantize": o.quantize, "kv_dtype": o.kv_dtype or o.dtype, "shards": o.serve_gpus}


def _bytes_per_weight(o: PlanOptions) -> float:
    """Bytes per parameter without a config: every weight in `dtype`, or quantized as lmforge stores it (int4:
    half a byte + an fp32 scale and a uint8 zero point per group; int8's per-row scales are negligible)."""
    if o.quantize is None:
        return dtype_bytes(o.dtype)
    return quant_bytes_per_weight(o.quantize, o.group_size)


# ---- rendering -----------------------------------------------------------------------------------------------


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _hours(h: float) -> str:
    if h >= 48:
        return f"{h / 24:,.1f} days"
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:.2g} min"


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _budget(plan: dict) -> str:
    b, r, law = plan["budget"], plan["budget"]["rule"], plan["budget"]["law"]
    rows = [
        (f"{r['tokens_per_param']:g} tokens/parameter", f"N = {_count(r['params'])}, D = {_count(r['tokens'])} tokens"),
        (f"{law['name']} law (eq. 4)", f"N = {_count(law['params'])}, D = {_count(law['tokens'])} tokens "
         f"({law['tokens_per_param']:.1f} per parameter), loss ≈ {law['loss']:.3f} nats/token"),
    ]  # fmt: skip
    return _table(f"budget C = {b['compute']:.3g} FLOPs = 6·N·D (N: all parameters, embeddings included)", rows)


def _run(plan: dict) -> str:
    m, t = plan["model"], plan["training"]
    shape = ""
    if "n_layer" in m:
        shape = (f"; {m['n_layer']} layers × d {m['d_model']}, {m['n_head']} heads (kv {m['n_kv_head']}), "
                 f"vocab {m['vocab_size']}, T = {m['seq_len']}")  # fmt: skip
    per_token = f"{m['flops_per_token']:.3g}/token: 6N + attention, PaLM" if "n_layer" in m else "6·N·D"
    rows = [
        ("model", f"{_count(m['params'])} parameters ({m['source']}){shape}"),
        ("tokens", f"{_count(t['tokens'])} ({t['tokens_per_param']:.1f} per parameter)"),
        ("FLOPs", f"{t['flops']:.3g} ({per_token})"),
    ]
    if "of_budget" in t and abs(t["of_budget"] - 1) > 0.01:
        rows.append(("vs budget", f"{t['of_budget']:.3g}× the {plan['budget']['compute']:.3g}-FLOP budget"))
    hours = t["accelerator_hours"]
    rows.append(("GPU-hours", (f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}") + f" at MFU {t['mfu']:.0%}"))
    rows.append(("wall clock", f"{_hours(t['wall_hours'])} on {t['n_accelerators']} accelerator(s)"))
    if t["cost"] is not None:
        rows.append(("cost", f"${t['cost']:,.0f} at ${t['price_per_hour']:g}/GPU-hour"))
    return _table("training run", rows)


def _training_memory(plan: dict) -> str:
    o, mem = plan["options"], plan["training_memory"]
    how = o["precision"] + (" autocast" if o["precision"] != "fp32" else "")
    how += ", checkpointing" if o["checkpointing"] else ""
    how += f", {mem['sharding'].upper()} × {mem['ranks']}, micro-batch {o['micro_batch']}"
    rows = [(k, _bytes(mem[k])) for k in ("weights", "gradients", "optimizer")]
    if mem.get("ddp_buckets"):
        rows[1] = ("gradients", f"{_bytes(mem['gradients'])} (with DDP's bucket copy, {_bytes(mem['ddp_buckets'])})")
    if mem.get("fsdp_gathered"):
        rows[0] = ("weights", f"{_bytes(mem['weights'])} (with {_bytes(mem['fsdp_gathered'])} gathered unsharded)")
    fits = f"{'fits' if mem['fits'] else 'does NOT fit'} in {_bytes(plan['accelerator']['memory_bytes'])}"
    if mem["activations"] is None:
        rows += [("activations", "need --model-config (shapes)"), ("without them", f"{_bytes(mem['total'])}: {fits}")]
    else:
        rows += [
            ("activations", f"{_bytes(mem['activations'])} (Korthikanti et al.'s GPT formula: "
                            f"{_bytes(mem['korthikanti_activations'])})"),
            ("transient", f"{_bytes(mem['temporary'])} (backward's gradients, optimizer temporaries)"),
            ("peak", f"{_bytes(mem['total'])} at {mem['phase']}: {fits}"),
        ]  # fmt: skip
    return _table(f"training memory per rank ({how})", rows)


def _serving(plan: dict) -> str:
    o, s = plan["options"], plan["serving"]
    q = f"{s['quantize']} weights (rest {s['dtype']})" if s["quantize"] else f"{s['dtype']} weights"
    title = f"serving on {s['shards']} accelerator(s): {q}, {s['kv_dtype']} KV cache, {o['reserve']:.0%} kept back"
    rows = [("weights", f"{_bytes(s['weights'])} per accelerator")]
    if s.get("kv_per_token") is None:
        return _table(title, rows + [("fits", f"{'yes' if s['fits'] else 'NO'} ({_bytes(s['usable'])} usable)"),
                                     ("KV cache", s["note"])])  # fmt: skip
    used = s["weights"] + s["kv_cache"]
    rows += [
        ("KV cache", f"{_bytes(s['kv_per_token'])}/token → {_bytes(s['kv_cache'])} at {s['context']:,} tokens × "
                     f"batch {s['batch']}"),
        ("fits", f"{'yes' if s['fits'] else 'NO'}: {_bytes(used)} of {_bytes(s['usable'])} usable"),
    ]  # fmt: skip
    if s["max_batch"] is None:
        rows.append(("largest batch", "not bounded by a cache (fixed-size state)"))
    else:
        rows.append(("largest batch", f"{s['max_batch']:,} sequences of {s['context']:,} tokens"))
        rows.append(("longest context", f"{s['max_context']:,} tokens at batch {s['batch']}"))
    return _table(title, rows)


def render(plan: dict) -> str:
    """The plan as readable tables, one per question."""
    parts = []
    if "accelerator" in plan:
        a, gpus = plan["accelerator"], plan["options"]["gpus"]
        parts.append(f"accelerator: {gpus} × {a['name']}, {a['peak_flops'] / 1e12:g} {a['dtype']} TFLOP/s dense, "
                     f"{a['memory_bytes'] / 2**30:g} GiB ({a['source']})")  # fmt: skip
    if "budget" in plan:
        parts.append(_budget(plan))
    if "model" in plan:
        parts += [_run(plan), _training_memory(plan), _serving(plan)]
    if "kv_example" in plan:
        parts.append("\n".join(["KV-cache worked example", *("  " + x for x in plan["kv_example"]["lines"])]))
    return "\n\n".join(parts) + "\n"
