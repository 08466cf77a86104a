"""Speculative decoding at batch 1 on this CPU: a draft model and prompt lookup against target-only decoding,
with the acceptance rate, the measured cost ratios, and the speed-up they predict beside the one measured.

Models: the target is a trained run (`--target`, default runs/medium), the draft a smaller one sharing its
tokenizer (`--draft`, default runs/tiny), loaded with `lmforge.train.resolve.resolve_model`; prompts are
64-token windows of held-out stdlib documents (`val_docs.jsonl` in the run's data folder). If a run is missing:
a random GPT-2-124M target, a random ~4x-smaller draft (6 layers, d=384) and random-token prompts, with a
warning — random models' α says nothing about trained ones.

Per temperature (greedy, then sampled at 0.8), one interleaved `Bench`:
  target only            `generate_stream` (the plain contiguous-cache path): the baseline
  target only, spec loop `speculative_generate` without a drafter (greedy only): the loop's own overhead
  draft γ=2, 4, 6        speculative_generate(target, prompt, params, draft=draft, gamma=γ)
  draft adaptive γ       γ starts at 4 and moves ±1 within [1, 8]
α and tokens per verify step come from each stream's `.stats`, summed over the prompts. Another Bench in the
same run times the target's and the draft's one-token forwards and the target's (γ+1)-token verify forward
at mid-generation context: c = draft ÷ target step, v = verify ÷ target step. Predicted speed-up =
`predicted_speedup(α, γ, c, v)`; measured = target-only median ÷ speculative median; measured ÷ predicted
(goal ≥ 0.8) is what the loop's overhead (sampling, verification, Python) leaves of the prediction.

Prompt lookup (no draft model), greedy, the same γ rows: each prompt is a held-out function, a comment asking
for it again and its first line, so a model that copies goes on with the function. Goal ≥ 1.5× over target
only. It runs on a trained model (the target run, else the draft run); a copy check says how much of the
functions the target's own output reproduces — a random model does not copy, and the rows then say so. No
prediction here: lookup proposes only what follows a match (often fewer than γ tokens, or none).

    python -m benchmarks.speculative                     # runs/medium + runs/tiny (~2-3 min on 2 quiet cores)
    python -m benchmarks.speculative --target runs/medium --draft runs/tiny --record
    python -m benchmarks.speculative --quick             # tiny random models, 12 tokens: a smoke run
    python -m benchmarks.speculative --quick --target runs/tiny --draft runs/tiny   # quick, on trained runs
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from benchmarks.decode import filled_cache
from benchmarks.harness import (
    Bench,
    BenchResult,
    Table,
    add_common_args,
    apply_common_args,
    command_line,
    format_environment,
    record,
    verdict,
)
from benchmarks.spec_inputs import (
    Models,
    copied_chars,
    load_models,
    lookup_prompts,
    random_lookup_prompts,
    random_prompts,
    text_prompts,
)
from lmforge.infer.fastpath import optimize_for_decode
from lmforge.infer.generate import generate_stream
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import (
    SpeculativeStats,
    expected_tokens_per_step,
    predicted_speedup,
    speculative_generate,
)
from lmforge.model import Transformer

TEMPERATURES = (0.0, 0.8)
DEFAULT_GAMMA = 4  # the headline rows; also where adaptive γ starts (it moves within [1, 2γ])
LOOKUP_NGRAM = 3
GOAL_PREDICTED, GOAL_LOOKUP = 0.8, 1.5
BASE = "target only"


@dataclass
class Plan:
    """Sizes of one run: prompts, their lengths, tokens generated, γ values."""

    prompts: int
    prompt_len: int
    new_tokens: int
    lookup_prompts: int
    lookup_new_tokens: int
    lookup_block: tuple[int, int]  # token length of the functions copied (min, max)
    gammas: tuple[int, ...] = (2, 4, 6)
    cost_repeats: int = 30


# fmt: off
PLANS = {
    # trained runs (max_seq_len 256): 64 + 128 and ≤120 + cue + 80 stay within the positions they trained on
    "trained": Plan(prompts=3, prompt_len=64, new_tokens=128, lookup_prompts=3, lookup_new_tokens=80,
                    lookup_block=(96, 120)),
    # random GPT-2 fallback: a step costs ~10x a trained run's, and α means nothing, so little is spent on it
    "random": Plan(prompts=1, prompt_len=32, new_tokens=32, lookup_prompts=1, lookup_new_tokens=32,
                   lookup_block=(40, 80), cost_repeats=10),
    "quick": Plan(prompts=2, prompt_len=16, new_tokens=12, lookup_prompts=1, lookup_new_tokens=12,
                  lookup_block=(12, 60), gammas=(2, 4), cost_repeats=3),
}
# fmt: on


# ---- running and timing ------------------------------------------------------------------------------------


def sum_stats(all_stats: Sequence[SpeculativeStats]) -> SpeculativeStats:
    """One SpeculativeStats with every counter summed over the prompts (α etc. follow from the sums)."""
    return SpeculativeStats(**{f.name: sum(getattr(s, f.name) for s in all_stats) for f in fields(SpeculativeStats)})


def sampling(temperature: float, n: int, index: int) -> SamplingParams:
    # ignore_eos: every case generates exactly n tokens per prompt; the seed is fixed per prompt
    return SamplingParams(max_new_tokens=n, temperature=temperature, seed=1000 + index, ignore_eos=True)


@dataclass
class Case:
    """One way of decoding every prompt; `run()` does it once and keeps the last outputs and summed stats."""

    name: str
    gamma: int | None  # None: target only; for adaptive, where it starts
    decode: Callable[[list[int], SamplingParams], object]
    prompts: list[list[int]]
    temperature: float
    n: int
    draft_cost: float = 0.0  # 0 for prompt lookup and target only
    adaptive: bool = False
    outputs: list[list[int]] = field(default_factory=list)
    stats: SpeculativeStats | None = None

    def run(self) -> None:
        outputs, stats = [], []
        for i, prompt in enumerate(self.prompts):
            stream = self.decode(prompt, sampling(self.temperature, self.n, i))
            # islice: target-only generate_stream stops after the n-th token, as the speculative loop does
            outputs.append(list(itertools.islice(stream, self.n)))
            if hasattr(stream, "stats"):
                stats.append(stream.stats)
        self.outputs = outputs
        self.stats = sum_stats(stats) if stats else None


def target_only(model: Transformer, vocab: int):
    def decode(prompt, params):
        return generate_stream(model, prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                               seed=params.seed, vocab_size=vocab)  # fmt: skip

    return decode


def speculative(target: Transformer, vocab: int, **kwargs):
    def decode(prompt, params):
        return speculative_generate(target, prompt, params, vocab_size=vocab, **kwargs)

    return decode


@dataclass
class Costs:
    """Forward costs relative to the target's one-token step, measured at mid-generation context."""

    draft: float  # c (0 without a draft model)
    verify: dict[int, float]  # γ -> v
    result: BenchResult


def measure_costs(target: Transformer, draft: Transformer | None, context: int, gammas, repeats: int) -> Costs:
    """Interleaved: the target's one-token step (baseline), the draft's, and the target's (γ+1)-token verify
    forward for each γ, each on a cache holding `context` tokens, truncated back after every forward."""

    def forward(model: Transformer, tokens: int):
        cache = filled_cache(model.cfg, context, room=tokens)
        x = torch.zeros(1, tokens, dtype=torch.long)

        @torch.no_grad()
        def fn():
            model(x, cache=cache)
            cache.truncate(context)

        return fn

    bench = Bench(repeats=repeats, warmup=2, title=f"forward cost, cache holding {context} tokens")
    bench.add("target, 1 token", forward(target, 1), baseline=True)
    if draft is not None:
        bench.add("draft, 1 token", forward(draft, 1))
    verify = {g: f"target, {g + 1} tokens (verify γ={g})" for g in gammas}
    for g, name in verify.items():
        bench.add(name, forward(target, g + 1))
    result = bench.run()
    c = result["draft, 1 token"].ratio if draft is not None else 0.0
    return Costs(c, {g: result[name].ratio for g, name in verify.items()}, result)


def print_costs(costs: Costs) -> None:
    costs.result.table().print()
    c = f"c = draft step ÷ target step = {costs.draft:.3f}; " if costs.draft else ""
    print(c + "v(γ) = verify ÷ target step: " + ", ".join(f"v({g}) = {v:.2f}" for g, v in costs.verify.items()))


@dataclass
class CaseFigures:
    """A case's measured speed-up beside what its stats and the costs predict."""

    name: str
    speedup: float  # target-only median ÷ this median
    alpha: float | None = None
    tokens_per_step: float | None = None
    accepted_per_step: float | None = None  # mean accepted drafts per verify step
    drafts_per_step: float | None = None  # mean drafts proposed per verify step
    expected_tokens: float | None = None  # (1 − α^(γ+1)) / (1 − α)
    predicted: float | None = None

    @property
    def vs_predicted(self) -> float | None:
        return self.speedup / self.predicted if self.predicted else None


def case_figures(case: Case, result: BenchResult, costs: Costs) -> CaseFigures:
    row, s = CaseFigures(case.name, result[case.name].speedup), case.stats
    if s is None:  # generate_stream: the baseline
        return row
    if not s.drafted:  # the speculative loop without a drafter: it should cost what target only does
        row.predicted = 1.0
        return row
    row.alpha, row.tokens_per_step = s.alpha, s.tokens_per_step
    row.accepted_per_step, row.drafts_per_step = s.accepted / s.target_forwards, s.mean_gamma
    # The formula assumes γ drafts every step: true of a draft model (but for the last steps, which never draft
    # past max_new_tokens), not of prompt lookup, which proposes only what follows a match — often fewer or none.
    if not case.adaptive and case.draft_cost and case.gamma in costs.verify:
        row.expected_tokens = expected_tokens_per_step(s.alpha, case.gamma)
        row.predicted = predicted_speedup(s.alpha, case.gamma, case.draft_cost, costs.verify[case.gamma])
    return row


def fmt(x: float | None, spec: str = ".2f", missing: str = "") -> str:
    return missing if x is None else format(x, spec)


def na(x: float | None) -> str:
    return fmt(x, missing="n/a")


def greedy_match(case: Case, reference: Case) -> str:
    same = sum(a == b for a, b in zip(case.outputs, reference.outputs))
    return f"{same}/{len(reference.outputs)}"


def report(title: str, cases: list[Case], result: BenchResult, rows: list[CaseFigures]) -> Table:
    greedy = cases[0].temperature == 0
    columns = ["case", "median", "tok/s", "speed-up", "α", "drafts/step", "accepted/step", "tok/step (expected)",
               "predicted", "measured ÷ predicted"] + (["output = target only"] if greedy else [])  # fmt: skip
    table = Table(columns, title=title)
    for case, row in zip(cases, rows):
        r = result[case.name]
        tps = fmt(row.tokens_per_step) + (f" ({row.expected_tokens:.2f})" if row.expected_tokens else "")
        cells = [case.name + (" (base)" if case.name == BASE else ""), f"{r.median:.2f} s", f"{r.throughput:.1f}",
                 f"{row.speedup:.2f}×", fmt(row.alpha), fmt(row.drafts_per_step),
                 fmt(row.accepted_per_step), tps,
                 fmt(row.predicted) + ("×" if row.predicted else ""), fmt(row.vs_predicted)]  # fmt: skip
        if greedy:
            cells.append(greedy_match(case, cases[0]))
        table.add(*cells)
    return table


def spec_cases(target, vocab, prompts, temperature, n, gammas, draft=None, draft_cost=0.0) -> list[Case]:
    """Target only (the baseline), then γ in `gammas` and adaptive γ, with the draft model or, without one, prompt
    lookup; greedy draft benches add the speculative loop without drafts (its overhead alone)."""
    kind, how = ("draft", {"draft": draft}) if draft is not None else ("lookup", {"lookup_ngram": LOOKUP_NGRAM})
    cases = [Case(BASE, None, target_only(target, vocab), prompts, temperature, n)]
    if draft is not None and temperature == 0:
        cases.append(Case("target only, spec loop", None, speculative(target, vocab), prompts, temperature, n))
    for g in (*gammas, None):  # None: adaptive, from DEFAULT_GAMMA
        gamma, adaptive = g or DEFAULT_GAMMA, g is None
        name = f"{kind} adaptive γ (from {gamma}, ≤{2 * gamma})" if adaptive else f"{kind} γ={g}"
        decode = speculative(target, vocab, gamma=gamma, adaptive=adaptive, **how)
        cases.append(Case(name, gamma, decode, prompts, temperature, n, draft_cost, adaptive))
    return cases


def experiment(title: str, cases: list[Case], costs: Costs, args) -> list[CaseFigures]:
    """Time the cases interleaved, print their table, return their figures."""
    bench = Bench(repeats=args.repeats, warmup=args.warmup, title=title)
    for case in cases:
        bench.add(case.name, case.run, baseline=case.name == BASE, work=case.n * len(case.prompts), unit="tok")
    print(f"{title}: {len(cases)} cases × {len(cases[0].prompts)} prompts × {cases[0].n} tokens, "
          f"{args.warmup} + {args.repeats} interleaved rounds", flush=True)  # fmt: skip
    result = bench.run()
    rows = [case_figures(case, result, costs) for case in cases]
    report(title, cases, result, rows).print()
    return rows


def describe(model: Transformer) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{model.cfg.n_layer}L d={model.cfg.d_model} ({params / 1e6:.1f}M params)"


def make_prompts(m: Models, plan: Plan):
    """(prompts for the draft model, copy prompts for lookup, the copies' faithful continuations or None)."""
    text = m.docs is not None and m.tokenizer is not None
    if text and m.trained:
        prompts = text_prompts(m.docs, m.tokenizer, plan.prompts, plan.prompt_len)
    else:
        prompts = random_prompts(m.vocab_size, plan.prompts, plan.prompt_len)
    if text and m.lookup_trained:
        copy_prompts, references = lookup_prompts(m.docs, m.tokenizer, plan.lookup_prompts, plan.lookup_block)
    else:
        copy_prompts, references = (
            random_lookup_prompts(m.lookup_vocab, plan.lookup_prompts, plan.lookup_block[0]),
            None,
        )
    return prompts, copy_prompts, references


def main(argv: Sequence[str] | None = None) -> dict[str, float | None]:
    """Run the benchmark; returns the headline figures (also printed, and recorded with --record)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target run folder (default runs/medium; --quick: a tiny random model)")
    parser.add_argument("--draft", help="draft run folder, same tokenizer (default runs/tiny; --quick: random)")
    args = add_common_args(parser, repeats=3, warmup=1).parse_args(argv)
    if args.quick and args.repeats is None:
        args.repeats = 2
    args = apply_common_args(args)
    m = load_models(args.target, args.draft, args.quick)
    for model in {id(x): x for x in (m.target, m.draft, m.lookup_target)}.values():
        optimize_for_decode(model)  # one-row steps in the GEMV kernel: the best batch-1 path, as `lmforge generate`
    plan = PLANS["quick" if args.quick else "trained" if m.trained else "random"]
    if not args.quick and m.lookup_trained and not m.trained:  # random pair, but lookup on a trained run
        t = PLANS["trained"]
        plan = replace(plan, lookup_prompts=t.lookup_prompts, lookup_new_tokens=t.lookup_new_tokens,
                       lookup_block=t.lookup_block)  # fmt: skip
    if not args.quick and not m.trained:
        args.repeats = min(args.repeats, 2)  # a random GPT-2 pair: α means nothing, so keep the run short
    kind = "trained runs" if m.trained else "random weights"
    print(f"target {describe(m.target)}, draft {describe(m.draft)}, vocab {m.vocab_size}, {kind}, batch 1, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    for note in m.notes:
        print(note)
    prompts, copy_prompts, references = make_prompts(m, plan)

    costs = measure_costs(m.target, m.draft, plan.prompt_len + plan.new_tokens // 2, plan.gammas, plan.cost_repeats)
    print(format_environment(costs.result.env))
    print_costs(costs)
    rows: dict[str, list[CaseFigures]] = {}
    for temperature in TEMPERATURES:
        label = "greedy" if temperature == 0 else f"sampled T={temperature}"
        cases = spec_cases(m.target, m.vocab_size, prompts, temperature, plan.new_tokens, plan.gammas, m.draft,
                           costs.draft)  # fmt: skip
        rows[label] = experiment(f"draft-model speculative decoding, {label}", cases, costs, args)

    lookup_costs = costs
    if m.lookup_target is not m.target:  # lookup runs on another (trained) model: its own verify costs
        context = sum(map(len, copy_prompts)) // len(copy_prompts) + plan.lookup_new_tokens // 2
        lookup_costs = measure_costs(m.lookup_target, None, context, plan.gammas, plan.cost_repeats)
        print_costs(lookup_costs)
    cases = spec_cases(m.lookup_target, m.lookup_vocab, copy_prompts, 0.0, plan.lookup_new_tokens, plan.gammas)
    lookup_rows = experiment(f"prompt lookup (n ≤ {LOOKUP_NGRAM}), greedy, copy task", cases, lookup_costs, args)
    copy_note = ""
    if references is not None:  # did the model copy? Its greedy output against the function's own text
        same, total = copied_chars([m.tokenizer.decode(out) for out in cases[0].outputs], references)
        copy_note = f"; target-only output copies {same / max(total, 1):.0%} of the function"
        print(f"copy check: the target-only greedy outputs reproduce {same} of {total} characters of the functions "
              f"before their first difference ({same / max(total, 1):.0%}): a low share means a lookup speed-up "
              "comes from other repetition, not from copying")  # fmt: skip

    headline = {label: next(r for r in rs if r.name == f"draft γ={DEFAULT_GAMMA}") for label, rs in rows.items()}
    lookup = max((r for r in lookup_rows if r.name != BASE), key=lambda r: r.speedup)
    figures: dict[str, float | None] = {"c": costs.draft, f"v{DEFAULT_GAMMA}": costs.verify[DEFAULT_GAMMA]}
    for label, r in headline.items():
        key = label.split()[0]  # greedy, sampled
        figures |= {f"{key}_alpha": r.alpha, f"{key}_speedup": r.speedup, f"{key}_predicted": r.predicted,
                    f"{key}_vs_predicted": r.vs_predicted}  # fmt: skip
    figures |= {"lookup_speedup": lookup.speedup, "lookup_alpha": lookup.alpha,
                "lookup_accepted_per_step": lookup.accepted_per_step}  # fmt: skip

    caveat = "" if m.trained else " (random weights: α meaningless)"
    lookup_caveat = "" if m.lookup_trained else " (random model: it does not copy)"
    lookup_text = (f"{lookup.speedup:.2f}× ({lookup.name}; α {na(lookup.alpha)}, {na(lookup.accepted_per_step)} "
                   f"accepted per step{copy_note})")  # fmt: skip
    print("\ngoals" + caveat)
    for label, r in headline.items():
        ok = r.vs_predicted is not None and r.vs_predicted >= GOAL_PREDICTED
        print(f"  {label}, γ={DEFAULT_GAMMA}: measured ≥ {GOAL_PREDICTED} × predicted: {r.speedup:.2f}× measured ÷ "
              f"{na(r.predicted)}× predicted = {na(r.vs_predicted)} {verdict(ok)} (α {na(r.alpha)})")  # fmt: skip
    print(f"  prompt lookup ≥ {GOAL_LOOKUP}× target only: {lookup_text} {verdict(lookup.speedup >= GOAL_LOOKUP)}"
          f"{lookup_caveat}")  # fmt: skip

    if args.record:
        cmd = command_line()
        what = f"speculative, batch 1, target {describe(m.target)}, draft {describe(m.draft)}{caveat}"
        for label, r in headline.items():
            record(f"{what}, {label}, γ={DEFAULT_GAMMA}: measured vs predicted speed-up over target only",
                   f"{r.speedup:.2f}× measured, {na(r.predicted)}× predicted (ratio {na(r.vs_predicted)}); α "
                   f"{na(r.alpha)}, c {costs.draft:.3f}, v {costs.verify[DEFAULT_GAMMA]:.2f}", cmd)  # fmt: skip
        record(f"prompt lookup (n ≤ {LOOKUP_NGRAM}), copy task, target {describe(m.lookup_target)}{lookup_caveat}: "
               "speed-up over target only", lookup_text, cmd)  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
