"""Two ranks (one GPU each, NCCL) must choose the same kernel for every bucket.

Needs >= 2 GPUs (`make test-gpu` on a multi-GPU machine); with one GPU it is skipped,
saying so.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from moe_dispatch import ExpertWeights, preset
        from moe_dispatch.adaptive import AdaptiveMoE

        spec = preset("gpt-oss-120b", tp=8)
        weights = ExpertWeights.random(spec, device="cuda", seed=0)
        moe = AdaptiveMoE(spec, weights, buckets=BUCKETS, timed_replays=50, progress=lambda line: None)
        report = moe.capture()
        rows = {
            str(r.bucket): {"winner": r.winner, "times": {n: s.median_ms for n, s in r.timings_ms.items()}}
            for r in report.results
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ranks_agree_on_every_bucket(tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    tables = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for bucket in map(str, BUCKETS):
        winners = [t[bucket]["winner"] for t in tables]
        assert len(set(winners)) == 1, f"bs={bucket}: ranks chose {winners}"
    report = os.environ.get("MOE_DISPATCH_AGREEMENT_TABLE")
    if report:
        with open(report, "w") as f:
            json.dump(tables, f, indent=1)
