"""The GPU inference script runs end to end on the CPU (a smoke run: figures not checked, structure is)."""

import json

from benchmarks.gpu_infer import main


def test_gpu_infer_quick_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "gpu_infer.json"
    assert main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"decode", "batching", "speculative"} <= results.keys()
    assert all("error" not in results[s] for s in ("decode", "batching", "speculative"))
    assert results["decode"]["float32"]["ours_tok_s"] > 0
