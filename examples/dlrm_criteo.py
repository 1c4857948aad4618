"""TorchRec DLRM on Criteo-format data, with DimGrow searching the embedding dimensions.

A stock TorchRec DLRM training script (DLRMTrain, DistributedModelParallel,
TrainPipelineSparseDist, dense features from ``Batch.dense_features``). The lines marked
``# DimGrow`` are the only changes DimGrow needs; delete them and this is the plain DLRM
script again (``swap_in`` is placed after ``apply_optimizer_in_backward`` so that line
stays as it was: the swap carries the tables' fused optimizer over).

    torchrun --nproc_per_node=2 examples/dlrm_criteo.py \\
        --data /work/shared/data/criteo/criteo_head8k --epochs 1 --max-steps 40

Criteo-format input: TSV ``label, I1..I13, C1..C26`` (the Kaggle layout), either one file
or a prefix with ``_train/_dev/_test.tsv`` files; it is encoded once into ``--cache-dir``.
Rank 0 writes ``dims.json`` (the found dim per table) into ``--out`` at the end.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path  # DimGrow

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_dimgrow import DimGrowConfig, export, swap_in  # DimGrow
from torchrec_dimgrow.artifacts import write_dims_json  # DimGrow
from torchrec_dimgrow.data import PreparedData, Split, load_prepared, prepare
from torchrec_dimgrow.distributed.env import exit_rank  # DimGrow

log = logging.getLogger("dlrm_criteo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TorchRec DLRM on Criteo-format data")
    p.add_argument("--data", required=True, help="Criteo TSV file, or prefix of _train/_dev/_test.tsv")
    p.add_argument("--cache-dir", default="/tmp/dlrm_criteo_cache")
    p.add_argument("--out", default="runs/dlrm_criteo")  # DimGrow: where dims.json goes
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--dense-arch-layer-sizes", default="64,16")
    p.add_argument("--over-arch-layer-sizes", default="64,32,1")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="dense Adam")
    p.add_argument("--embedding-lr", type=float, default=0.05, help="fused Adagrad on the tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--dimgrow-gates", choices=["val", "train"], default="val")  # DimGrow: gate-step data
    return p.parse_args(argv)


def init_dist() -> tuple[int, int, torch.device]:
    """torchrun's environment, or a 1-process world when run with plain ``python``."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def load_data(args: argparse.Namespace, rank: int) -> PreparedData:
    """Encode the TSV once (rank 0), then every rank memory-maps the encoded splits."""
    if rank == 0:
        prepare(args.data, "criteo", args.cache_dir)
    dist.barrier()
    return load_prepared(args.cache_dir)


def batches(
    split: Split, args: argparse.Namespace, rank: int, world: int, epoch: int, shuffle: bool
) -> Iterator[Batch]:
    return split.batches(
        args.batch_size,
        shuffle=shuffle,
        seed=args.seed,
        epoch=epoch,
        rank=rank,
        world_size=world,
        drop_last=shuffle,
    )


def make_model(data: PreparedData, args: argparse.Namespace, device: torch.device) -> DLRMTrain:
    eb_configs = [
        EmbeddingBagConfig(
            name=f"t_{name}", embedding_dim=args.embedding_dim, num_embeddings=size, feature_names=[name]
        )
        for name, size in data.vocab().items()
        if name.startswith("C")
    ]
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
            dense_in_features=data.num_dense,
            dense_arch_layer_sizes=[int(x) for x in args.dense_arch_layer_sizes.split(",")],
            over_arch_layer_sizes=[int(x) for x in args.over_arch_layer_sizes.split(",")],
            dense_device=device,
        )
    )


@torch.no_grad()
def evaluate(pipeline: TrainPipelineSparseDist, it: Iterator[Batch]) -> float:
    """AUC over an iterator, run through the training pipeline in eval mode (as dlrm_main does)."""
    model = pipeline._model
    model.eval()
    auroc = BinaryAUROC(compute_on_cpu=True)
    while True:
        try:
            _, logits, labels = pipeline.progress(it)
        except StopIteration:
            break
        auroc.update(torch.sigmoid(logits), labels.int())
    model.train()
    return float(auroc.compute())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(args.threads)
    rank, world, device = init_dist()
    torch.manual_seed(args.seed)
    data = load_data(args, rank)

    train_model = make_model(data, args, device)
    apply_optimizer_in_backward(
        torch.optim.Adagrad, train_model.model.sparse_arch.parameters(), {"lr": args.embedding_lr}
    )
    dimgrow = DimGrowConfig(d_max=args.embedding_dim, gate_lr=5e-3)  # DimGrow
    handle = swap_in(train_model, dimgrow, align="project")  # DimGrow: the EBC becomes a DimGrow one
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type),
        batch_size=args.batch_size,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
        constraints=handle.constraints(),  # DimGrow: keep the tables on the fused kernel
    )
    plan = planner.collective_plan(train_model, get_default_sharders(), dist.GroupMember.WORLD)
    model = DistributedModelParallel(module=train_model, device=device, plan=plan)
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=args.learning_rate),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
    handle.attach(model, pipeline=pipeline, optimizer=optimizer)  # DimGrow
    val_epochs = (batches(data.val, args, rank, world, e, shuffle=True) for e in itertools.count())  # DimGrow
    gate_batches = itertools.chain.from_iterable(val_epochs)  # DimGrow: validation batches for gate steps

    torch.manual_seed(args.seed * 1000 + rank)
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        limit = None if args.max_steps is None else max(args.max_steps - step, 0)
        it = itertools.islice(batches(data.train, args, rank, world, epoch, shuffle=True), limit)
        while True:
            try:
                loss, _, _ = pipeline.progress(it)
            except StopIteration:
                break
            gate_batch = next(gate_batches) if args.dimgrow_gates == "val" else None  # DimGrow
            handle.step(gate_batch)  # DimGrow: gate step; every check_interval: grow/shrink/re-plan
            step += 1
            if rank == 0 and step % 20 == 0:
                log.info("epoch %d step %d loss %.4f", epoch, step, loss.item())
        auc = evaluate(pipeline, batches(data.val, args, rank, world, 0, shuffle=False))
        if rank == 0:
            log.info(
                "epoch %d: val AUC %.4f (%d steps, %.1f s)", epoch, auc, step, time.perf_counter() - start
            )
        if args.max_steps is not None and step >= args.max_steps:
            break
    test_auc = evaluate(pipeline, batches(data.test, args, rank, world, 0, shuffle=False))

    found = handle.found_dims()  # DimGrow
    if rank == 0:
        log.info("test AUC %.4f", test_auc)
        log.info("DimGrow: %d re-plans, found dims %s", handle.replans, found)  # DimGrow
        out = Path(args.out)  # DimGrow
        out.mkdir(parents=True, exist_ok=True)  # DimGrow
        write_dims_json(out / "dims.json", found)  # DimGrow: retrain from these dims
        if any(found.values()):  # DimGrow: the exported plain DLRM runs
            fresh = make_model(data, args, torch.device("cpu"))  # DimGrow: your model, built again
            retrain_model = export(fresh, found, device="cpu")  # DimGrow: plain EBC at the found dims
            loss, _ = retrain_model(next(data.test.batches(64)))  # DimGrow
            log.info("exported DLRM runs: loss %.4f", loss.item())  # DimGrow
    dist.barrier()  # every rank leaves the group together, after rank 0's export
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_rank(main())  # DimGrow: a finished rank skips CPython's teardown, where gloo may abort it
