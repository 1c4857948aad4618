"""Online DimGrow: one in-order pass over a time-ordered stream that publishes serving versions.

The stream is the prepared data's train split, read once in its stored row order (no
shuffle, no epochs, no early stopping); each global batch is ``batch_size * world_size``
consecutive rows, rank ``r`` taking its share as in the search. Per step, on batch ``t``:

1. **progressive validation**: the model in ``eval()`` scores batch ``t`` before any update
   has seen it; logits and labels join a sliding window of the last ``window_rows`` rows
   (AUC, log loss, rows, over every rank's rows);
2. the **DimGrow step** (:class:`~torchrec_dimgrow.controller.DimGrowController`): the gate
   step on batch ``t`` (lookups detached, so the tables never see it here) and, every
   ``check_interval`` steps, grow/shrink/re-plan exactly as in the search;
3. the **training step** on batch ``t``.

Publish rule. A publish falls due every ``publish_every`` steps. It runs at the first step,
at or after falling due, at which the dims are *settled*: no grow, shrink or re-plan in the
last ``settle_steps`` steps (default: the collection's ``check_interval``). While unsettled
it stays pending (one pending publish at most; later due points merge into it). At the end
of the stream a last version is published if the dims are settled and the model trained
since the previous one. Each publish writes ``OUT/versions/vK`` from the *current* searched
weights at the current found dims (no retrain; see :mod:`torchrec_dimgrow.online` for the
exact function the published model computes) and then replaces ``OUT/versions/LATEST``
(:mod:`torchrec_dimgrow.versions`).

World size. The training noise of the gate mixing is one column shuffle of the *global*
batch (:class:`GlobalShuffle`, an all-gather of the batch's active columns), the tables are
drawn per table from their own generator, and the torch RNG is reseeded identically on every
rank at each step: with a head free of per-rank batch statistics (no BatchNorm) and of
dropout, 2 ranks take exactly the decisions of 1 rank fed the same global batches.

Settings: :class:`~torchrec_dimgrow.runconfig.StreamConfig` (the ``stream`` section of a
search, ``search --stream``); the stream's length is ``train.max_steps`` (default: the whole
split) and its window metrics are logged every ``log_every`` steps (``run.log_every``).

Checkpoints (:mod:`torchrec_dimgrow.checkpoint`) are written every ``checkpoint_every`` steps
(``run.checkpoint_every``; 0, the default, means every ``publish_every`` steps) after that
step's publish; they record the rows consumed, the
versions published, the window and the column means, so a killed run resumes at the next
unconsumed row. A version published after the last checkpoint is recognised by its step
when the resumed run reaches that step again, and kept rather than written twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import get_unwrapped_module

from torchrec_dimgrow.artifacts import gate_table, write_dims_json, write_json_atomic
from torchrec_dimgrow.checkpoint import read_run_state
from torchrec_dimgrow.config import DimGrowConfig, StreamConfig, TrainConfig
from torchrec_dimgrow.controller import CheckReport
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.data.store import VOCAB_FILE, load_vocab
from torchrec_dimgrow.diskwrite import agreed_write, disk_errors
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.shard_io import copy_block
from torchrec_dimgrow.errors import Interrupted
from torchrec_dimgrow.online import (
    ColumnMeans,
    fold,
    gather_active_tables,
    load_into_ctr,
    logit_error_bound,
    reference_logits,
    request_of,
)
from torchrec_dimgrow.recipes.retrain import retrain_spec
from torchrec_dimgrow.recipes.search_loop import DimGrowSearch, SearchOptions
from torchrec_dimgrow.recipes.stream_state import GlobalShuffle, StreamState, Window
from torchrec_dimgrow.saved_model import build_model
from torchrec_dimgrow.serving import export_serving, serving_vocab
from torchrec_dimgrow.versions import VersionPublisher, finish_version

log = logging.getLogger(__name__)

CHECK_FILE = "check.pt"
WINDOW_FILE = "window.json"
STREAM_LOG = "stream_metrics.jsonl"
SEMANTICS = (
    "searched weights at the found dims, no retrain: kept columns (gate > final_threshold) as "
    "tables; adapter = gate-scaled projection rows; bias = (1 - gate) * column mean * projection "
    "over active columns (dropped columns: gate 0); head = searched WideDeep (rank-0 BatchNorm stats)"
)


@dataclass
class StreamOptions(SearchOptions):
    stream: StreamConfig = field(default_factory=StreamConfig)
    crash_at_step: int | None = None  # tests: os._exit(3) right after this step (a kill)
    kill_in_publish: int | None = None  # tests: os._exit(3) once version K is staged, before its rename


class DimGrowStream(DimGrowSearch):
    """The search's model, controller and checkpoints, driven over a stream (one pass, in order)."""

    opts: StreamOptions

    def __init__(
        self,
        data: PreparedData,
        dg: DimGrowConfig,
        tc: TrainConfig,
        planning: PlanningConfig,
        env: DistEnv,
        opts: StreamOptions,
    ) -> None:
        self.sc = opts.stream
        global_batch = tc.batch_size * env.world_size
        self.window = Window(math.ceil(self.sc.window_rows / global_batch))
        super().__init__(data, dg, tc, planning, env, opts)
        self.sstate = StreamState()
        if opts.resume is not None:
            self.sstate = StreamState(**read_run_state(opts.resume)["stream"])
        else:
            self._init_tables()
        self.settle = self.sc.settle_steps if self.sc.settle_steps is not None else dg.check_interval
        self.publisher = VersionPublisher(opts.out_dir, self.sc.keep_versions)
        if opts.kill_in_publish is not None:
            doomed = opts.kill_in_publish
            self.publisher.after_staging = lambda n: os._exit(3) if n == doomed else None
        self.root_model = get_unwrapped_module(self.dmp)
        self.last_sample: Batch | None = None
        self.last_loss = float("nan")

    def _extra_stateful(self) -> dict[str, Any]:
        self.means = ColumnMeans(len(self.coll.table_names), int(self.coll.gate_values().shape[1]))
        self.noise = GlobalShuffle(self.tc.seed * 7919 + 17, self.env.rank, self.env.world_size)
        self.coll.post.noise_fn = self.noise
        return {"window": self.window, "column_means": self.means, "noise": self.noise}

    @torch.no_grad()
    def _init_tables(self) -> None:
        """Draw every table from its own generator (seed, table): the same on any sharding."""
        weights = self.store.views()[0]
        std = self.dg.init_std
        caps = self.coll.capacity_list()
        for t, cfg in enumerate(self.coll._user_configs):
            gen = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + t)
            full = torch.empty(cfg.num_embeddings, caps[t]).normal_(0.0, std, generator=gen)
            cols = list(range(caps[t]))
            copy_block(full, weights[cfg.name], cols, cols)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """Progressive validation: the current model in eval() on a batch it has not seen."""
        self.dmp.eval()
        try:
            pooled = self.coll.ebc(batch.sparse_features)
            if hasattr(pooled, "wait") and not hasattr(pooled, "values"):
                pooled = pooled.wait()
            self.means.add(self.coll, pooled)
            logits = self.root_model.head(self.coll.post.summed(pooled)).float()
        finally:
            self.dmp.train()
        return logits  # type: ignore[no-any-return]

    def stream_step(self, batch: Batch) -> CheckReport | None:
        batch = batch.to(self.env.device)
        logits = self.score(batch)
        labels = batch.labels.float()
        self.window.add(logits, labels)
        ss = self.sstate
        ss.scored_rows += int(labels.numel())
        ss.scored_logloss_sum += float(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        )
        self.last_sample = batch
        self.dmp.train()
        check = self.controller.step(self._loss, batch)  # gate step on the not-yet-trained batch
        self.dense_opt.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        self.dense_opt.step()
        self.last_loss = float(loss.detach())
        return check

    def after_check(self, check: CheckReport | None) -> None:
        super().after_check(check)
        if check is not None and check.changed:
            self.sstate.last_change_step = self.state.step
            self.means.reset()

    def settled(self) -> bool:
        return self.state.step - self.sstate.last_change_step >= self.settle and self.means.rows > 0

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        st, ss, sc, tc = self.state, self.sstate, self.sc, self.tc
        self._wall_before, self._wall_start = st.wall_seconds, time.perf_counter()
        world = self.env.world_size
        global_batch = tc.batch_size * world
        if ss.rows_consumed % global_batch:
            raise ValueError(
                f"the checkpoint consumed {ss.rows_consumed} rows, not a whole number of "
                f"{global_batch}-row global batches: resume with the same batch size x world size"
            )
        start = ss.rows_consumed // global_batch
        total = self.data.train.num_batches(tc.batch_size, world, drop_last=True)
        if tc.max_steps is not None:
            total = min(total, tc.max_steps)
        if st.step == 0:
            self._log_trajectory()
        batches = self.data.train.batches(
            tc.batch_size,
            shuffle=False,
            rank=self.env.rank,
            world_size=world,
            drop_last=True,
            start_batch=start,
        )
        try:
            for index, batch in enumerate(batches, start=start):
                if index >= total:
                    break
                # One RNG stream per step, the same on every rank: column re-draws do not depend
                # on which rank owns a table or on what earlier steps drew (a resume continues
                # exactly). Dropout masks therefore repeat across ranks' rows; the tests that
                # compare world sizes run without dropout.
                torch.manual_seed(tc.seed * 1_000_003 + 7 * st.step + 1)
                check = self.stream_step(batch)
                st.step += 1
                ss.rows_consumed += global_batch
                self._check_finite(self.last_loss)
                self.after_check(check)
                if st.step % sc.publish_every == 0:
                    ss.pending = True
                if ss.pending and self.settled():
                    self.publish()
                if self.opts.log_every and st.step % self.opts.log_every == 0:
                    self._log_window()
                every = self.opts.checkpoint_every or sc.publish_every
                if every and st.step % every == 0:
                    self.save_checkpoint()
                if self.opts.crash_at_step is not None and st.step == self.opts.crash_at_step:
                    os._exit(3)
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted_at(), step=st.step) from None
        last = ss.published_steps[-1] if ss.published_steps else 0
        if st.step > last and self.settled():
            self.publish()
        st.done = True
        self.save_checkpoint()
        return self._finish_stream()

    def _log_window(self) -> None:
        m = self.window.metrics()
        if self.env.is_main:
            dims = self.coll.dims_list()
            log.info(
                "step %d  rows %d  window auc %.4f  logloss %.4f  total_dim %d  versions %d",
                self.state.step,
                self.sstate.rows_consumed,
                m["auc"],
                m["logloss"],
                sum(dims),
                self.sstate.versions,
            )
            gates = self.coll.gate_values()
            active = [[round(float(g), 4) for g in gates[t, :d]] for t, d in enumerate(dims)]
            line = {
                "step": self.state.step,
                "rows": self.sstate.rows_consumed,
                "window": m,
                "dims": dims,
                "gates": active,
            }
            with (self.opts.out_dir / STREAM_LOG).open("a") as fh:
                fh.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ publishing
    def publish(self) -> None:
        """Write the next serving version from the current weights (collective; rank 0 writes)."""
        st, ss = self.state, self.sstate
        began = time.perf_counter()
        active = gather_active_tables(self.coll, self.store)
        mu = self.means.mean()
        window = self.window.metrics()
        number = ss.versions + 1
        result: list[tuple[int, bool]] = []

        def write_all() -> None:
            if self.env.is_main:
                result.append(self._write_version(number, active, mu, window))

        agreed_write(self.publisher.base, write_all, self.env.world_size)
        ss.pending = False
        ss.published_steps.append(st.step)
        ss.versions = number
        seconds = time.perf_counter() - began
        ss.publish_seconds += seconds
        if self.env.is_main and result:
            what = "published" if result[0][1] else "kept"
            log.info("step %d: %s version v%d (%.2f s)", st.step, what, result[0][0], seconds)

    def _write_version(
        self, number: int, active: dict[str, torch.Tensor], mu: torch.Tensor, window: dict[str, float]
    ) -> tuple[int, bool]:
        folded = fold(self.coll, active, mu)
        dims = {f: folded.dims[f] for f in self.data.fields}
        if not any(dims.values()):
            raise RuntimeError(f"step {self.state.step}: every found dim is 0, nothing to publish")
        plain = build_model(retrain_spec(self.data, dims, self.tc))
        load_into_ctr(plain, folded, self.root_model.head)
        sample = self.last_sample
        assert sample is not None
        feats = sample.sparse_features.to("cpu")
        reference = reference_logits(self.coll, self.root_model.head, active, mu, feats)
        with torch.no_grad():
            plain_logits = plain(feats).float()
        st, ss = self.state, self.sstate
        max_bag = int(feats.lengths().max()) if feats.lengths().numel() else 1

        def write(staging: Path) -> None:
            extra = {
                "dims": dims,
                "dropped_fields": [f for f in self.data.fields if dims[f] == 0],
                "step": st.step,
                "rows_consumed": ss.rows_consumed,
                "semantics": SEMANTICS,
            }
            export_serving(
                plain,
                self.data.fields,
                self.sc.serving,
                staging,
                extra_meta=extra,
                field_rows=dict(zip(self.data.fields, self.data.vocab_sizes)),
                vocab=self._vocab(),
            )
            write_dims_json(staging / "dims.json", dims)
            write_json_atomic(
                staging / WINDOW_FILE,
                {"step": st.step, "rows_consumed": ss.rows_consumed, "window": window, **self._cumulative()},
            )
            write_json_atomic(staging / "gates.json", gate_table(self.coll))
            torch.save(
                {
                    "request": request_of(feats, self.data.fields),
                    "reference_logits": reference.cpu(),
                    "plain_fp32_logits": plain_logits.cpu(),
                    "labels": sample.labels.float().cpu(),
                    "column_means": mu,
                    "serving": self.sc.serving,
                    "logit_error_bound": logit_error_bound(plain, self.sc.serving, max_bag),
                },
                staging / CHECK_FILE,
            )
            finish_version(
                staging,
                number,
                st.step,
                {"rows_consumed": ss.rows_consumed},
                {"kind": "stream_version", "serving": self.sc.serving},
                self.opts.data_fingerprint,
                self.env.world_size,
            )

        with disk_errors(self.publisher.base):
            return self.publisher.publish(number, st.step, write)

    def _vocab(self) -> dict[str, Any] | None:
        directory = self.data.directory
        if directory is None or not (Path(directory) / VOCAB_FILE).is_file():
            return None
        return serving_vocab(load_vocab(directory), self.data.fields, self.data.vocab_sizes, str(directory))

    def _cumulative(self) -> dict[str, Any]:
        ss = self.sstate
        return {
            "scored_rows": ss.scored_rows,
            "progressive_logloss_rank0": ss.scored_logloss_sum / max(1, ss.scored_rows),
        }

    # ------------------------------------------------------------------ checkpoints and results
    def _run_state(self) -> dict[str, Any]:
        return {**super()._run_state(), "stream": asdict(self.sstate)}

    def _config(self) -> dict[str, Any]:  # config.json of a stream run from Python
        return {**super()._config(), "stream": {**asdict(self.sc), "enabled": True}}

    def _finish_stream(self) -> dict[str, Any]:
        st, ss = self.state, self.sstate
        found = self.coll.export_dims()
        window = self.window.metrics()
        metrics = {
            "steps": st.step,
            "rows_consumed": ss.rows_consumed,
            "versions": ss.versions,
            "published_steps": ss.published_steps,
            "window": window,
            "progressive_logloss_rank0": ss.scored_logloss_sum / max(1, ss.scored_rows),
            "replans": self.controller.replans,
            "publish_seconds_total": round(ss.publish_seconds, 3),
            "world_size": self.env.world_size,
            "wall_seconds": round(self.elapsed(), 3),
            "found_total_dim": sum(found.values()),
        }
        if self.env.is_main:
            self._publish(found, metrics)  # dims, metrics, gates, config and trajectory files
        return {"dims": found, "metrics": metrics, "trajectory": list(self.trajectory)}


def run_stream(
    data: PreparedData,
    dg: DimGrowConfig,
    tc: TrainConfig,
    planning: PlanningConfig,
    env: DistEnv,
    opts: StreamOptions,
) -> dict[str, Any]:
    """Run online DimGrow over ``data.train`` (in order, once); versions go to ``opts.out_dir/versions``."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    return DimGrowStream(data, dg, tc, planning, env, opts).run()
