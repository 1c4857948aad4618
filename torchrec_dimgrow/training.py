"""Training and evaluation helpers shared by the search, the baselines and the retrain.

Evaluation works for 1 or N ranks: each rank scores its own slice of every batch, the
scores are all-gathered, and every rank computes the same AUC (so early-stopping
decisions agree without another broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from torchrec_dimgrow.data import Split


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def auc_logloss(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ROC AUC and log loss of logits ``scores`` against 0/1 ``labels``."""
    if scores.numel() == 0:
        raise ValueError("cannot evaluate on an empty split")
    labels = labels.to(torch.float32)
    if labels.min() == labels.max():
        auc = float("nan")
    else:
        auc = float(binary_auroc(torch.sigmoid(scores), labels.to(torch.int64)))
    logloss = float(bce(scores, labels))
    positives = int(labels.sum())
    return {"auc": auc, "logloss": logloss, "positives": positives, "negatives": labels.numel() - positives}


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Standard error of a ROC AUC estimated on ``positives`` / ``negatives`` examples.

    Hanley & McNeil (1982): ``Q1 = A / (2 - A)``, ``Q2 = 2 A^2 / (1 + A)``,
    ``SE^2 = (A (1 - A) + (n1 - 1)(Q1 - A^2) + (n0 - 1)(Q2 - A^2)) / (n1 n0)``.
    NaN without both classes.
    """
    if positives < 1 or negatives < 1 or math.isnan(auc):
        return float("nan")
    a = auc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    return math.sqrt(max(var, 0.0))


# How many standard errors above its start a validation AUC must be before the run counts as
# having learned anything (and early stopping may end it): 2 SE, about the 98th percentile
# of the start's own noise, so an untrained model rarely passes by chance.
LEARNED_Z = 2.0


def learned_floor(start: Mapping[str, float]) -> float:
    """The validation AUC a run must beat before early stopping may end it.

    ``start`` is the metric of the model before its first step (:func:`evaluate`'s dict).
    Why: on data whose label lives in interactions, a model starting from near-zero
    embeddings sits on a plateau at chance AUC for several epochs before it learns; a
    patience counted from the first epoch ends such a run there, and its "best" epoch is an
    untrained model. Chance (0.5) is the floor's lowest start: an unlucky start below it
    must still climb past chance.
    """
    auc = float(start["auc"])
    if math.isnan(auc):
        return float("nan")  # one class only: no AUC to wait for, the plain patience rule
    base = max(auc, 0.5)
    se = auc_standard_error(base, int(start["positives"]), int(start["negatives"]))
    return base + LEARNED_Z * se


def gather_1d(local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of rank-dependent length over all ranks (in rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    n = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = torch.empty(world, dtype=torch.int64, device=local.device)
    dist.all_gather_into_tensor(sizes, n)
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    out = torch.empty(world * longest, dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, padded)
    return torch.cat([out[r * longest : r * longest + int(sizes[r])] for r in range(world)])


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterator[Batch],
    device: torch.device,
    forward: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over ``batches`` (this rank's part), model in eval mode."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    run = forward or (lambda m, b: m(b.sparse_features))
    try:
        for batch in batches:
            batch = batch.to(device)
            scores.append(run(model, batch).float().reshape(-1))
            labels.append(batch.labels.float().reshape(-1))
    finally:
        model.train(was_training)
    return torch.cat(scores), torch.cat(labels)


def evaluate(
    model: nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    forward: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
) -> dict[str, float]:
    """AUC / log loss over a whole split, identical on every rank."""
    device = device or torch.device("cpu")
    it = split.batches(batch_size, rank=rank, world_size=world_size)
    scores, labels = predict(model, it, device, forward)
    return auc_logloss(gather_1d(scores).cpu(), gather_1d(labels).cpu())


class ValStream:
    """Endless shuffled pass over ``split``: this rank's validation batches of the gate steps.

    Resumable: ``epoch`` and ``batch`` are the position of the next batch (the epoch of the
    shuffle and the batch within it); a stream opened at a saved position continues with the
    very batches the saved one would have yielded.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch: int = 0,
        batch: int = 0,
    ) -> None:
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch = epoch, batch
        self._it = self._open()

    def _open(self) -> Iterator[Batch]:
        return self.split.batches(
            self.batch_size,
            shuffle=True,
            seed=self.seed + 7919,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            start_batch=self.batch,
        )

    def __iter__(self) -> ValStream:
        return self

    def __next__(self) -> Batch:
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.batch = 0
            self._it = self._open()
            batch = next(self._it)
        self.batch += 1
        return batch


def is_better(value: float, best: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best)


@dataclass
class EarlyStopping:
    """Early stopping on a validation metric where higher is better (AUC): the one rule
    of the search, the retrain, the baselines' trainer and the DLRM benchmark.

    :meth:`update` returns True when the epoch is the new best (the caller snapshots
    what it exports then). A NaN never improves on a number, but the first epoch is
    always the best so far, so there is always a best epoch. Training stops once
    ``patience`` epochs in a row did not improve, but never while the best metric is
    still at or below ``floor`` (:func:`learned_floor`: within noise of where the run
    started): a run that has not learned anything yet is on a plateau, not converged, and
    only the epoch cap ends it. ``floor`` NaN: no such wait.
    """

    patience: int
    best: float = float("nan")
    best_epoch: int = -1
    bad_epochs: int = 0
    floor: float = float("nan")

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's metric; True when it is the new best."""
        if is_better(value, self.best) or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        if self.learned:
            self.bad_epochs += 1
        return False

    @property
    def learned(self) -> bool:
        """The best metric so far is above the floor (always True without a floor)."""
        return math.isnan(self.floor) or (not math.isnan(self.best) and self.best > self.floor)

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


def fit(
    model: nn.Module,
    epochs: int,
    batches: Callable[[int], Iterable[Batch]],
    step: Callable[[Batch, int], None],
    validate: Callable[[], dict[str, float]],
    early: EarlyStopping,
    on_best: Callable[[], None] | None = None,
    max_steps: int | None = None,
    after_step: Callable[[Batch, int], None] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> tuple[list[dict[str, float]], int]:
    """The shared epoch loop of the retrain and the SuperNet baselines.

    Per epoch: ``model.train()``, ``step(batch, step_index)`` then
    ``after_step(batch, step_index)`` over ``batches(epoch)``, then ``validate()`` (AUC /
    log loss) and :class:`EarlyStopping`, whose floor is set from a ``validate()`` before
    the first step (:func:`learned_floor`); ``on_best`` runs when an epoch is the new best
    (snapshot what the caller restores or exports), then ``on_epoch_end(row)`` with the
    epoch's history row (before the early-stopping break, so the last epoch gets one too).
    ``after_step`` is where a run hangs what follows its weight step (the baselines'
    architecture/gate step and schedules); ``max_steps`` caps the total step count.
    Returns the per-epoch history (epoch, steps so far, val AUC and log loss) and the step
    count. The search recipe keeps its own loop: it checkpoints and resumes mid-epoch.
    """
    history: list[dict[str, float]] = []
    steps = 0
    early.floor = learned_floor(validate())
    for epoch in range(epochs):
        model.train()
        for batch in batches(epoch):
            step(batch, steps)
            if after_step is not None:
                after_step(batch, steps)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        val = validate()
        row = {"epoch": epoch, "step": steps, "val_auc": val["auc"], "val_logloss": val["logloss"]}
        history.append(row)
        improved = early.update(val["auc"], epoch)
        if improved and on_best is not None:
            on_best()
        if on_epoch_end is not None:
            on_epoch_end(row)
        if not improved and early.stop:
            break
        if max_steps is not None and steps >= max_steps:
            break
    return history, steps
