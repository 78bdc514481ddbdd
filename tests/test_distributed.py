"""Adapter training under torch.distributed: DDP and FSDP2 (``fully_shard``), 2 gloo processes on CPU.

One spawn runs both wrappers for a ``seq_bn`` adapter and a LoRA (tests/distributed_worker.py): each rank trains on
its half of a global batch of 8. The result must equal one process trained on the whole batch (≤ 1e-6); the
gradients reduced across ranks are exactly the adapter's and the head's (DDP: the names in its communication
buckets; FSDP2: the parameters that received gradients); the frozen base does not move; the adapter saved by
rank 0 loads into a fresh model and reproduces the single-process model.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from distributed_worker import METHODS, base, batch, make, train, worker

import fxadapt

WORLD = 2


def test_ddp_and_fsdp2_equal_one_process(tmp_path):
    mp.start_processes(
        worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    data = {k: v for k, v in batch().items() if k != "labels"}
    for method in METHODS:
        single = train("none", method)
        reference = make(method)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name in single["params"]:
                    p.copy_(single["params"][name])
            expected = reference.eval()(**data).logits
        trainable = single["trainable"]
        assert trainable and all(".fxadapt.task." in n or n.startswith("classifier.") for n in trainable)
        for wrapper in ("ddp", "fsdp"):
            got = results[(wrapper, method)]
            where = f"{wrapper} {method}"
            assert got["synced"] == trainable, where  # only adapter and head gradients cross ranks
            assert got["moved"] == [], where  # the frozen base did not change
            for name, value in single["params"].items():
                torch.testing.assert_close(
                    got["params"][name], value, rtol=0, atol=1e-6, msg=f"{where}: {name}"
                )
            fresh = base().eval()
            fxadapt.load_adapter(fresh, tmp_path / f"{wrapper}-{method}")
            with torch.no_grad():
                torch.testing.assert_close(fresh(**data).logits, expected, rtol=0, atol=1e-6, msg=where)
