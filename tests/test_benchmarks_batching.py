"""benchmarks/batching.py: the --quick run end to end, in process (result structure, parity, record rows), the
sampled HF one-at-a-time path, and its extrapolation against an exactly known FIFO timeline."""

import math

import pytest
import torch

from benchmarks import batching
from benchmarks.hf_baselines import Job, Served, ServiceModel, fifo_timeline, percentile


@pytest.fixture
def one_thread():
    """One torch thread (the machine is shared: oversubscribed threads are slow), restored afterwards."""
    before = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(before)


def test_quick_run(monkeypatch, capsys, one_thread):
    rows = []
    monkeypatch.setattr(batching, "record", lambda figure, value, command, **kw: rows.append((figure, value)))
    result = batching.main(["--quick", "--record", *one_thread])

    runs, jobs = result["runs"], result["jobs"]
    assert list(runs) == ["ours", "hf_single", "hf_static"]
    n, total = len(jobs), sum(j.max_new for j in jobs)
    assert n == batching.QUICK.requests
    assert [j.arrival for j in jobs] == sorted(j.arrival for j in jobs) and jobs[0].arrival == 0
    for run in runs.values():
        assert run.output_tokens == total
        assert len(run.ttft) == n and all(t > 0 for t in run.ttft)
        assert len(run.itl) == total - n  # one gap per token after a request's first
        assert all(g >= 0 for g in run.itl)
        assert run.span > 0 and run.tok_s == pytest.approx(total / run.span)
    assert not runs["hf_single"].estimated  # --quick serves every request for real
    assert runs["ours"].extra["max_running"] >= 1 and runs["ours"].extra["preemptions"] >= 0
    assert runs["hf_static"].extra["generated_tokens"] >= total
    ratios = result["ratios"]
    assert ratios["vs_single"] == pytest.approx(runs["ours"].tok_s / runs["hf_single"].tok_s)
    assert ratios["vs_static"] == pytest.approx(runs["ours"].tok_s / runs["hf_static"].tok_s)

    parity = result["parity"]
    assert parity["engine_equal"] == parity["batch_equal"] == parity["requests"]
    assert parity["distinct"] > 2  # the outputs depend on the context, not one repeated token

    out = capsys.readouterr().out
    for text in ("KV cache:", "greedy parity", "output tok/s", "TTFT p99", "goals", "× HF 1-at-a-time"):
        assert text in out
    assert result["capacity"] in out
    assert len(rows) == 2
    assert "× HF one at a time" in rows[0][1] and "TTFT" in rows[1][1]


def test_sampled_one_at_a_time_is_marked_and_complete(one_thread):
    torch.set_num_threads(1)
    model, hf = batching.make_models(batching.QUICK, 0)
    jobs = batching.make_workload(batching.QUICK, model.cfg.vocab_size, 0)
    run = batching.run_hf_single(hf, jobs, sample=3, seed=0)
    assert run.estimated and len(run.extra["sample"]) == 3
    assert len(run.ttft) == len(jobs) and all(t > 0 for t in run.ttft)
    assert run.output_tokens == sum(j.max_new for j in jobs)
    assert len(run.itl) == sum(jobs[i].max_new - 1 for i in run.extra["sample"])  # measured gaps only
    assert run.notes[0].startswith("* 3 of 8 requests served")


def exact_served(jobs, a=0.05, b=1e-3, d=0.02, tail=0.004, t=100.0):
    """Jobs served back to back with times that follow the service model exactly."""
    served = []
    for job in jobs:
        first = a + b * len(job.prompt)
        times = [t + first + i * d for i in range(job.max_new)]
        served.append(Served(job, t, times, times[-1] + tail))
        t = times[-1] + tail + 7.0  # gaps between calls must not matter
    return served


def test_extrapolated_timeline_equals_the_exact_fifo_timeline():
    jobs = [Job(i, arr, [1] * p, o) for i, (arr, p, o) in
            enumerate([(0.0, 20, 5), (0.1, 300, 30), (0.15, 64, 2), (3.0, 500, 9), (9.0, 16, 40)])]  # fmt: skip
    everything = exact_served(jobs)
    model = ServiceModel.fit(everything[1::2])  # two served: the model is exact
    assert (model.a, model.b, model.d, model.tail) == pytest.approx((0.05, 1e-3, 0.02, 0.004))
    ttft_all, last_all = fifo_timeline(jobs, everything, model)
    ttft_part, last_part = fifo_timeline(jobs, everything[1::2], model)
    assert ttft_part == pytest.approx(ttft_all) and last_part == pytest.approx(last_all)
    # By hand: job 0 starts at 0; job 1 queues behind it; job 3 (arrives at 3.0) finds the server idle.
    end0 = 0.05 + 0.02 + 4 * 0.02 + 0.004
    assert ttft_all[0] == pytest.approx(0.07)
    assert ttft_all[1] == pytest.approx(end0 + 0.35 - 0.1)
    assert ttft_all[3] == pytest.approx(0.55)
    assert last_all == pytest.approx(9.0 + 0.066 + 39 * 0.02)


def test_percentile():
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([1, 2, 3, 4, 5], 0.99) == pytest.approx(4.96)
    assert percentile([7], 0.99) == 7
    assert math.isnan(percentile([], 0.5))
