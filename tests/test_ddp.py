"""``--nproc 2``: two CPU processes (gloo) train with DistributedDataParallel and end with equal parameters."""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab.bench.ddp import launch
from attnlab.bench.presets import get_preset
from attnlab.bench.quality_jobs import Job
from attnlab.bench.results import load_results


def test_two_cpu_processes_train_to_equal_parameters(tmp_path: Path) -> None:
    config = get_preset("smoke").tasks["mqar"][0]
    launch([Job("mqar", "softmax", 0, config, "smoke")], out_dir=tmp_path, nproc=2, save_parameters=True,
           timeout=240)
    records = load_results(tmp_path / "results.jsonl")
    assert len(records) == 1 and records[0]["world_size"] == 2 and records[0]["task"] == "mqar"
    assert records[0]["status"] == "ok"  # rank 0 writes through the same Recorder as the other runners
    rank0 = torch.load(tmp_path / "parameters-mqar-softmax-seed0-rank0.pt")
    rank1 = torch.load(tmp_path / "parameters-mqar-softmax-seed0-rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # training moved the parameters away from the (seeded) initialisation
    from attnlab.bench.quality_tasks import TASKS

    torch.manual_seed(0)
    initial = TASKS["mqar"].build(config, "softmax", True).state_dict()
    assert any(not torch.equal(initial[n], rank0[n]) for n in rank0)
