"""Helpers for tests/test_distributed.py: the training recipe, run in one process or in each of N gloo ranks.

``train(wrapper, method, rank, world)`` trains a tiny BERT classifier's adapter for a few steps on a fixed global
batch of 8 rows, each rank on its contiguous slice; ``wrapper`` is ``"none"`` (one process, the whole batch),
``"ddp"`` (DistributedDataParallel) or ``"fsdp"`` (FSDP2 ``fully_shard`` on every layer and the root).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import make_config

GLOBAL_BATCH = 8
STEPS = 3
METHODS = ("seq_bn", "lora")


def base():
    """The pretrained model every process starts from (same seed: same weights on every rank)."""
    import transformers as tf

    torch.manual_seed(0)
    config = make_config("bert", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(config)


def make(method: str):
    import fxadapt

    model = base()
    spec = fxadapt.BottleneckConfig() if method == "seq_bn" else fxadapt.LoRAConfig(r=4, init_weights="bert")
    fxadapt.inject(model, {"task": spec})
    fxadapt.train_adapter(model, "task")
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (GLOBAL_BATCH, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] > 50).long()}


def trainable_names(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def train(wrapper: str, method: str, rank: int = 0, world: int = 1, out: str | None = None) -> dict:
    """Train; returns {"params": adapter+head tensors (full, CPU), "synced": names reduced across ranks}."""
    import fxadapt

    model = make(method)
    names = trainable_names(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    synced: set[str] = set()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    data = {k: v[rows] for k, v in batch().items()}
    if wrapper == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)

        def record(state, bucket):  # every gradient DDP reduces passes through its buckets
            synced.update(by_id[id(p)] for p in bucket.parameters())
            return allreduce_hook(state, bucket)

        net.register_comm_hook(torch.distributed.group.WORLD, record)
    elif wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in fxadapt.model.layers_of(model)[1]:
            fully_shard(layer)
        fully_shard(model)
        net = model
    else:
        net = model
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    for _ in range(STEPS):
        loss = net(**data).loss
        loss.backward()
        if wrapper == "fsdp":  # only adapter and head parameters get (reduce-scattered) gradients
            synced.update(n for n, p in model.named_parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
    if wrapper == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():  # gather the full parameters for saving (on every rank)
            if isinstance(module, FSDPModule):
                module.unshard()
    params = {n: p.detach().clone().cpu() for n, p in model.named_parameters() if n in names}
    moved = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
    if out is not None and rank == 0:
        fxadapt.save_adapter(model, out, "task", with_head=True)
    return {"params": params, "synced": sorted(synced), "trainable": names, "moved": moved}


def worker(rank: int, world: int, init_file: str, folder: str) -> None:
    """One rank: every (wrapper, method) pair; rank 0 saves the adapter and the results."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        results = {}
        for wrapper in ("ddp", "fsdp"):
            for method in METHODS:
                out = os.path.join(folder, f"{wrapper}-{method}")
                results[(wrapper, method)] = train(wrapper, method, rank, world, out)
                torch.distributed.barrier()
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
    finally:
        torch.distributed.destroy_process_group()
