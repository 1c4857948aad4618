"""One DimGrow search: train, gate-step, check, grow/shrink/re-plan, early-stop, publish.

One code path for 1 or N ranks: the model always goes through TorchRec's DMP, so the
single-process search is exactly the sharded one with world size 1.

Per training step (the reference schedule, DARTS-style):
1. a training batch updates the tables (fused in-backward optimizer), the projections and
   the backbone;
2. a validation batch updates only the gates (BCE + gate penalty), with the lookups
   detached so the tables never see validation data;
3. every ``check_interval`` steps the gate table is all-gathered, the pure policy decides
   grow/shrink, every rank applies the same changes, and tables whose capacity changed
   are re-planned together.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.datasets.utils import Batch
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_dimgrow.artifacts import gate_table, write_dims_json, write_json_atomic
from torchrec_dimgrow.budget import start_dims
from torchrec_dimgrow.checkpoint import CheckpointClient, read_run_state, saved_plan
from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.controller import CheckReport, DimGrowController
from torchrec_dimgrow.data import PreparedData, Split
from torchrec_dimgrow.data.blocks import field_blocks
from torchrec_dimgrow.diskwrite import deferred_sigint, disk_errors, was_interrupted
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.runtime import ShardedModel, shard_model
from torchrec_dimgrow.errors import Interrupted, NonFiniteError
from torchrec_dimgrow.modules.tables import field_bytes
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.policy import final_dims
from torchrec_dimgrow.recipes.search_model import build_search_model
from torchrec_dimgrow.recipes.search_state import SearchOptions, SearchState
from torchrec_dimgrow.training import EarlyStopping, ValStream, bce, evaluate, learned_floor

log = logging.getLogger(__name__)

TRAJECTORY_COLUMNS = ["step", "field", "logical_dim", "capacity", "min_gate", "max_gate"]


def _max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class DimGrowSearch:
    """Owns the sharded model, optimizers and state of one search run."""

    def __init__(
        self,
        data: PreparedData,
        dg: DimGrowConfig,
        tc: TrainConfig,
        planning: PlanningConfig,
        env: DistEnv,
        opts: SearchOptions,
    ) -> None:
        self.data, self.dg, self.tc, self.planning, self.env, self.opts = data, dg, tc, planning, env, opts
        self.state = SearchState(early=EarlyStopping(tc.early_stop_patience))
        torch.manual_seed(tc.seed)
        use_blocks = opts.blocks is not None and opts.blocks.enabled
        self.blocks = field_blocks(data, opts.blocks) if use_blocks else None
        self.model, self.coll = build_search_model(data, dg, tc, self.blocks)
        saved_plan = self._restore_capacities(opts.resume) if opts.resume is not None else None
        self.sharded: ShardedModel = shard_model(
            self.model,
            env.device,
            planning,
            EmbeddingOptimizer(tc.embedding_optimizer, tc.embedding_lr),
            saved_plan=saved_plan,
        )
        self.dmp = self.sharded.dmp
        self.store = self.sharded.store_for(self.coll)
        gates = {id(p) for p in self.coll.gate_parameters()}
        dense = [
            p for _, p in in_backward_optimizer_filter(self.dmp.named_parameters()) if id(p) not in gates
        ]
        self.dense_opt = torch.optim.Adam(dense, lr=tc.lr)
        # The same controller a user drives in their own pipeline: gate optimizer (Adam at
        # gate_lr), importance window, policy counters, all-gather + decide + apply + agreement.
        self.controller = DimGrowController(
            {"": self.coll}, stores={"": self.store}, dense_optimizers=[self.dense_opt]
        )
        self.trajectory: list[dict[str, Any]] = []
        self.checkpoints = CheckpointClient(
            self.dmp,
            {
                "dense_opt": self.dense_opt,
                "controller": self.controller,
                **self._extra_stateful(),
            },
            env.rank,
            env.world_size,
        )
        restored = self.checkpoints.load(opts.resume) if opts.resume is not None else None
        if restored is not None:
            raw = restored.run_state["state"]
            saved_world = restored.saved_world_size
            if saved_world != env.world_size:  # continue each split where the rows consumed so far end
                raw = {
                    **raw,
                    **{k: raw[k] * saved_world // env.world_size for k in ("batch_in_epoch", "val_batch")},
                }
            self.state = SearchState.from_dict(raw)
            self.trajectory = list(restored.run_state["trajectory"])
        if restored is None or not restored.rng_restored:  # with other ranks the RNG streams differ anyway
            torch.manual_seed(tc.seed * 1000 + env.rank)
        self.coll.post.gates_bypassed = self.state.learning
        self.val_stream = ValStream(
            data.val,
            tc.batch_size,
            tc.seed,
            env.rank,
            env.world_size,
            self.state.val_epoch,
            self.state.val_batch,
        )
        self._note_memory()
        self.board = _summary_writer(opts.tensorboard) if env.is_main else None

    # ------------------------------------------------------------------ pieces
    def _extra_stateful(self) -> dict[str, Any]:
        """More objects whose ``state_dict`` a checkpoint keeps (a subclass's; model built)."""
        return {}

    def _restore_capacities(self, ckpt: Path) -> ShardingPlan | None:
        """Rebuild the tables at the checkpoint's widths; return the plan they were sharded with."""
        meta = read_run_state(ckpt)
        self.coll.restore_widths(meta["dims"], meta["capacity"])
        if int(meta["world_size"]) != self.env.world_size:
            return None  # another world size: the planner places the restored tables afresh
        return saved_plan(ckpt, self.env.rank)

    def _note_memory(self) -> None:
        st = self.state
        st.peak_embedding_bytes = max(st.peak_embedding_bytes, self.coll.embedding_bytes(physical=True))
        st.peak_rank_bytes = max(st.peak_rank_bytes, _max_over_ranks(self.store.local_bytes()))

    def _loss(self, batch: Batch) -> torch.Tensor:
        return bce(self.dmp(batch.sparse_features), batch.labels)

    def next_val_batch(self) -> Batch:
        """The next gate-step batch; its position goes into the state a checkpoint saves."""
        vbatch = next(self.val_stream)
        self.state.val_epoch, self.state.val_batch = self.val_stream.epoch, self.val_stream.batch
        return vbatch

    def train_step(self, batch: Batch, vbatch: Batch | None) -> tuple[float, CheckReport | None]:
        """One training step on ``batch``, then the controller's DimGrow step on ``vbatch``
        (none in a learn-first epoch: ``vbatch`` is ``None`` there)."""
        dev = self.env.device
        batch = batch.to(dev)
        self.dmp.train()
        self.dense_opt.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        self.dense_opt.step()
        if vbatch is None:
            self.controller.clear_gate_grads()
            return float(loss.detach()), None
        return float(loss.detach()), self.controller.step(self._loss, vbatch.to(dev))

    def after_check(self, check: CheckReport | None) -> None:
        """Book-keep what the controller's check did: re-plan stats, memory, trajectory."""
        if check is None or not check.changed:
            return
        report = check.reports[""]
        changes = check.changes[""]
        if report.replanned:
            self._note_memory()
        self._log_trajectory(sorted({c.table for c in changes}))

    def _log_trajectory(self, tables: list[int] | None = None) -> None:
        gates = self.coll.gate_values()
        dims = self.coll.dims_list()
        caps = self.coll.capacity_list()
        for t in tables if tables is not None else range(len(dims)):
            active = gates[t, : dims[t]]
            self.trajectory.append(
                {
                    "step": self.state.step,
                    "field": self.coll.table_names[t],
                    "logical_dim": dims[t],
                    "capacity": caps[t],
                    "min_gate": round(float(active.min()), 6),
                    "max_gate": round(float(active.max()), 6),
                }
            )

    def evaluate(self, split: Split) -> dict[str, float]:
        return evaluate(
            self.dmp, split, self.tc.batch_size, self.env.device, self.env.rank, self.env.world_size
        )

    # ------------------------------------------------------------------ main loop
    def elapsed(self) -> float:
        """Wall seconds of the whole run, including the parts before any resume."""
        return self._wall_before + time.perf_counter() - self._wall_start

    def _check_finite(self, loss: float) -> None:
        """Stop on a NaN/inf loss or gate, on every rank at the same step (one tiny all-reduce)."""
        bad = torch.tensor([0 if math.isfinite(loss) else 1], dtype=torch.int64)
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.coll.gate_parameters()):
            bad[0] = 2
        if self.env.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        code = int(bad.item())
        if code:
            what = "training loss" if code == 1 else "gate logits"
            raise NonFiniteError(f"step {self.state.step}: non-finite {what}; {self._kept()}")

    def _kept(self) -> str:
        """Where the last good checkpoint is, for the NaN guard's message."""
        ckpt = self.opts.out_dir / "checkpoint"
        if not ckpt.is_dir():
            return "no checkpoint was written yet (try a smaller train.lr / dimgrow.gate_lr)"
        return f"the last good checkpoint stays in {ckpt} (try a smaller train.lr / dimgrow.gate_lr)"

    def _interrupted_at(self) -> str:
        """The one line a Ctrl-C prints: where the run stopped and how to continue it."""
        where = f"interrupted at step {self.state.step}"
        if not (self.opts.out_dir / "checkpoint").is_dir():
            return f"{where}, before the first checkpoint: nothing to resume (run it again)"
        return f"{where}; resume with --resume {self.opts.out_dir}"

    def run(self) -> dict[str, Any]:
        st, tc = self.state, self.tc
        self._wall_before, self._wall_start = st.wall_seconds, time.perf_counter()
        if self.opts.resave:  # a later resume then needs no resharding (and the old one is kept)
            self.save_checkpoint()
        if st.step == 0:
            self._log_trajectory()
            # Where the search starts: early stopping waits until validation AUC is clearly
            # above it (training.learned_floor), whatever the dims do meanwhile.
            start = self.evaluate(self.data.val)
            st.early.floor = learned_floor(start)
            st.chance_floor = learned_floor({**start, "auc": 0.5})
        per_epoch = self.data.train.num_batches(tc.batch_size, self.env.world_size, drop_last=True)
        total = per_epoch * tc.epochs if tc.max_steps is None else min(tc.max_steps, per_epoch * tc.epochs)
        bar = tqdm(
            total=total,
            initial=st.step,
            disable=self.opts.quiet or not self.env.is_main or not sys.stderr.isatty(),
            desc="search",
        )
        try:
            while (
                not st.done
                and self._judged_epochs() < tc.epochs
                and (tc.max_steps is None or st.step < tc.max_steps)
            ):
                batches = self.data.train.batches(
                    tc.batch_size,
                    shuffle=True,
                    seed=tc.seed,
                    epoch=st.epoch,
                    rank=self.env.rank,
                    world_size=self.env.world_size,
                    drop_last=True,
                    start_batch=st.batch_in_epoch,
                )
                for batch in batches:
                    vbatch = None if st.learning else self.next_val_batch()
                    loss, check = self.train_step(batch, vbatch)
                    st.step += 1
                    st.batch_in_epoch += 1
                    self._check_finite(loss)
                    bar.update(1)
                    self.after_check(check)
                    if self.opts.log_every and st.step % self.opts.log_every == 0:
                        self._log_trajectory()
                        if self.board is not None:
                            self.board.add_scalar("train/loss", loss, st.step)
                        bar.set_postfix(loss=f"{loss:.4f}", dims=sum(self.coll.dims_list()))
                    if tc.max_steps is not None and st.step >= tc.max_steps:
                        break
                    if self.opts.checkpoint_every and st.step % self.opts.checkpoint_every == 0:
                        self.save_checkpoint()
                self._end_epoch()
                if tc.max_steps is not None and st.step >= tc.max_steps:
                    st.done = True
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted_at(), step=self.state.step) from None
        except CheckpointException as exc:
            if not was_interrupted(exc):
                raise
            raise Interrupted(self._interrupted_at(), step=self.state.step) from None
        bar.close()
        if self.board is not None:
            self.board.close()
        st.done = True
        return self._finish(self.elapsed())

    def _end_epoch(self) -> None:
        st = self.state
        metrics = self.evaluate(self.data.val)
        st.history.append(
            {
                "epoch": st.epoch,
                "step": st.step,
                "val_auc": metrics["auc"],
                "val_logloss": metrics["logloss"],
                "total_dim": sum(self.coll.dims_list()),
                "phase": "learn" if st.learning else "search",
            }
        )
        if st.learning:
            self._end_learning_epoch(metrics)
        elif st.early.update(metrics["auc"], st.epoch):
            st.best_gates = self.coll.gate_values().tolist()
            st.best_dims = self.coll.dims_list()
        if self.env.is_main:
            log.info(
                "epoch %d  step %d  val_auc %.4f  logloss %.4f  total_dim %d  bytes %d  replans %d",
                st.epoch,
                st.step,
                metrics["auc"],
                metrics["logloss"],
                sum(self.coll.dims_list()),
                self.coll.embedding_bytes(physical=False),
                self.controller.replans,
            )
        if self.board is not None:
            self._board_epoch(metrics)
        st.epoch += 1
        st.batch_in_epoch = 0
        if self._learns_first():
            self._start_learning()
        if st.early.stop:
            st.done = True
        self.save_checkpoint()

    # ------------------------------------------------------------------ learn first
    # Why: the gates judge a column by how much the loss rises when its values are
    # replaced by another row's. On data whose label lives only in interactions, a model
    # that has learned nothing yet gives every column the same (zero) answer, and the
    # gates' own noise (at g = 0.5 half of every column is another row's value) keeps it
    # from learning: a search stayed at chance AUC for all its epochs on Zipf-id,
    # interaction-only data, whatever the table learning rate or init scale. So a search
    # still within noise of chance after half its epochs (best validation AUC not two
    # standard errors above 0.5 nor above its start, ``training.learned_floor``) stops
    # judging: every table goes to the columns its storage block holds anyway, every gate
    # and counter starts afresh, the gates leave the forward, and plain training runs until
    # validation clears early stopping's floor. Then the search judges from the trained
    # tables. These epochs do not count against ``train.epochs`` (at most that many run).
    # Half the epochs, not one or two: on the drawn suite many searches sit at chance for
    # 3-4 epochs and then learn with their gates at small dims, and learn-first from
    # epoch 2 left them with 2-4x the bytes or, on two seeds, at chance (the block-width
    # plain model learned slower than the gated dim-1 one). Chance, not the start: where a
    # random model already scores above chance (0.59 on some drawn instances), the gates
    # have a signal to judge, and a slow climb from there is learning, not the stall.
    def _learns_first(self) -> bool:
        """Whether the epoch that just ended completed the first half of ``train.epochs``
        (at least 2) of a search still within noise of chance (and judging epochs remain)."""
        st = self.state
        after = max(2, self.tc.epochs // 2)
        due = st.epoch == after and st.learn_epochs == 0 and not st.early.learned
        at_chance = not math.isnan(st.chance_floor) and not st.early.best > st.chance_floor
        return due and at_chance and self._judged_epochs() < self.tc.epochs

    def _start_learning(self) -> None:
        st = self.state
        target = start_dims(
            self.coll.max_dims,
            self.coll.dim_costs(),
            self.coll.budget_bytes(),
            replace(self.dg, initial_dim=None),
        )
        report = self.controller.restart({"": target})
        self.after_check(report)
        self.coll.post.gates_bypassed = True
        st.learning = True
        if self.env.is_main:
            log.warning(
                "validation AUC %.4f is still within noise of chance after %d epochs (needs > "
                "%.4f): training without gates at dims %s until it is clear of it, then the search "
                "starts judging",
                st.early.best,
                st.epoch,
                st.early.floor,
                target,
            )

    def _judged_epochs(self) -> int:
        """Epochs run with the gates judging: what ``train.epochs`` counts."""
        return self.state.epoch - self.state.learn_epochs

    def _end_learning_epoch(self, metrics: dict[str, float]) -> None:
        st = self.state
        st.learn_epochs += 1
        if not metrics["auc"] > st.early.floor:
            # At most ``train.epochs`` of them: data it cannot learn from ends the run.
            st.done = st.learn_epochs >= self.tc.epochs
            return
        st.learning = False
        self.coll.post.gates_bypassed = False
        # Gates and counters are as _start_learning's restart left them: learn-first epochs
        # take no gate step. The search's best epoch is chosen among the epochs that judge.
        st.early = EarlyStopping(st.early.patience, floor=st.early.floor)
        st.best_gates, st.best_dims = [], []
        if self.env.is_main:
            log.info("learned (val_auc %.4f): the search starts judging", metrics["auc"])

    def _board_epoch(self, metrics: dict[str, float]) -> None:
        assert self.board is not None
        step, dims, gates = self.state.step, self.coll.dims_list(), self.coll.gate_values()
        self.board.add_scalar("val/auc", metrics["auc"], step)
        self.board.add_scalar("val/logloss", metrics["logloss"], step)
        self.board.add_scalar("dims/total", sum(dims), step)
        for t, name in enumerate(self.coll.table_names):
            self.board.add_scalar(f"dims/{name}", dims[t], step)
            if dims[t]:
                self.board.add_scalar(f"gates/{name}/min_active", float(gates[t, : dims[t]].min()), step)
        self.board.flush()

    def save_checkpoint(self) -> None:
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.dense_opt.param_groups[0]["params"]):
            raise NonFiniteError(f"step {self.state.step}: non-finite dense weights; {self._kept()}")
        self.state.wall_seconds = self.elapsed()
        run_state = self._run_state()
        opts = self.opts
        manifest = {"config": opts.run_config, "data": opts.data_fingerprint, "step": self.state.step}
        self.checkpoints.save(opts.out_dir / "checkpoint", run_state, manifest, opts.discard_latest)
        opts.discard_latest = False

    def _run_state(self) -> dict[str, Any]:
        """What a checkpoint records besides tensors (a subclass adds its own)."""
        return {
            "state": asdict(self.state),
            "dims": self.coll.dims_list(),
            "capacity": self.coll.capacity_list(),
            "trajectory": self.trajectory,
        }

    def found_dims(self) -> dict[str, int]:
        """Dims of the best-validation checkpoint: active slots with gate > final_threshold."""
        st = self.state
        gates = st.best_gates or self.coll.gate_values().tolist()
        dims = st.best_dims or self.coll.dims_list()
        rows = [g[:d] for g, d in zip(gates, dims)]
        return dict(zip(self.coll.table_names, final_dims(rows, self.dg)))

    def _finish(self, wall: float) -> dict[str, Any]:
        st = self.state
        found = self.found_dims()
        test = self.evaluate(self.data.test)
        vocab = self.blocks.vocab() if self.blocks is not None else self.data.vocab()
        metrics = {
            "val_auc": st.early.best,
            "best_epoch": st.early.best_epoch,
            "learned": st.early.learned,
            "val_auc_floor": None if math.isnan(st.early.floor) else st.early.floor,
            "search_test_auc": test["auc"],
            "search_test_logloss": test["logloss"],
            "steps": st.step,
            "epochs": st.epoch,
            "learn_epochs": st.learn_epochs,
            "wall_seconds": round(wall, 3),
            "world_size": self.env.world_size,
            "replans": self.controller.replans,
            "replan_seconds_total": round(self.controller.replan_seconds, 4),
            "replan_bytes_moved": self.controller.replan_bytes_moved,
            "peak_embedding_bytes": st.peak_embedding_bytes,
            "peak_rank_embedding_bytes": st.peak_rank_bytes,
            "found_total_dim": sum(found.values()),
            "found_embedding_bytes": field_bytes(vocab, found),
            "budget_bytes": self.coll.budget_bytes(),
            "dropped_fields": sorted(f for f, d in found.items() if d == 0),
            "history": st.history,
        }
        if self.env.is_main:
            if not st.early.learned:
                log.warning(
                    "validation AUC never rose clearly above its start (best %.4f, needed > %.4f) "
                    "in %d epochs: these dims are not a search result; train longer (--epochs) "
                    "or check that the label depends on the fields",
                    st.early.best,
                    st.early.floor,
                    st.epoch,
                )
            self._publish(found, metrics)
        return {"dims": found, "metrics": metrics}

    def _config(self) -> dict[str, Any]:  # config.json of a run from Python (the CLI hands its own)
        sections = {"train": asdict(self.tc), "planning": asdict(self.planning)}
        blocks = {"blocks": self.blocks.to_dict()} if self.blocks is not None else {}
        return {"dimgrow": self.dg.to_dict(), **sections, "data": self.data.source, **blocks}

    def _publish(self, found: dict[str, int], metrics: dict[str, Any]) -> None:
        """Write the result files into a staging dir, then move each into ``out_dir``.

        A failure while writing leaves the staging dir (removed) and never a mix of this
        run's and an earlier run's files.
        """
        final = self.opts.out_dir
        out = final / f".results-{uuid.uuid4().hex}"
        with disk_errors(final, partial=[out]):
            out.mkdir(parents=True)
            try:
                write_dims_json(out / "dims.json", found)
                write_json_atomic(out / "metrics.json", metrics)
                write_json_atomic(out / "gates.json", gate_table(self.coll))
                write_json_atomic(out / "config.json", self.opts.config_file or self._config())
                with (out / "trajectory.csv").open("w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=TRAJECTORY_COLUMNS)
                    writer.writeheader()
                    writer.writerows(self.trajectory)
                with deferred_sigint():
                    for item in sorted(out.iterdir()):
                        os.replace(item, final / item.name)
            finally:
                shutil.rmtree(out, ignore_errors=True)


def _summary_writer(directory: Path | None) -> Any:
    """A TensorBoard writer, or None; the search recipe has checked that the package is installed."""
    if directory is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(directory))
