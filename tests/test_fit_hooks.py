"""``training.fit``'s hook points: ``after_step`` and ``on_epoch_end`` (the baselines' gate
steps and epoch lines hang on them; the retrain passes neither)."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchrec_dimgrow.training import EarlyStopping, fit


def _fit_calls(
    aucs: list[float], epochs: int, per_epoch: int, max_steps: int | None = None, patience: int = 1
) -> tuple[list[tuple[str, Any]], list[dict[str, float]], int]:
    """Run ``fit`` with scripted validation AUCs; record every callback in order."""
    calls: list[tuple[str, Any]] = []
    scripted = iter([0.5, *aucs])  # the first validate() is the floor's start

    def validate() -> dict[str, float]:
        return {"auc": next(scripted), "logloss": 0.5, "positives": 1000, "negatives": 1000}

    history, steps = fit(
        nn.Linear(1, 1),
        epochs,
        lambda epoch: [f"b{epoch}.{i}" for i in range(per_epoch)],  # type: ignore[misc]
        lambda batch, i: calls.append(("step", (batch, i))),
        validate,
        EarlyStopping(patience),
        on_best=lambda: calls.append(("best", None)),
        max_steps=max_steps,
        after_step=lambda batch, i: calls.append(("after", (batch, i))),
        on_epoch_end=lambda row: calls.append(("epoch_end", row["epoch"])),
    )
    return calls, history, steps


def test_fit_runs_after_step_after_every_step_with_its_batch_and_index() -> None:
    calls, _, steps = _fit_calls([0.9, 0.95], epochs=2, per_epoch=3)
    step_calls = [c for c in calls if c[0] in ("step", "after")]
    expected = []
    for i, batch in enumerate(["b0.0", "b0.1", "b0.2", "b1.0", "b1.1", "b1.2"]):
        expected += [("step", (batch, i)), ("after", (batch, i))]
    assert step_calls == expected and steps == 6


def test_fit_calls_on_epoch_end_after_on_best_and_on_the_epoch_that_stops() -> None:
    # epoch 0 best, epoch 1 worse -> patience 1 stops after epoch 1: it still gets its end call
    calls, history, _ = _fit_calls([0.9, 0.8, 0.95], epochs=3, per_epoch=1)
    ends = [c for c in calls if c[0] in ("best", "epoch_end")]
    assert ends == [("best", None), ("epoch_end", 0), ("epoch_end", 1)]
    assert [h["epoch"] for h in history] == [0, 1]


def test_fit_max_steps_stops_mid_epoch_after_the_after_step_hook() -> None:
    calls, history, steps = _fit_calls([0.9], epochs=3, per_epoch=4, max_steps=2)
    assert [c for c in calls if c[0] == "after"] == [("after", ("b0.0", 0)), ("after", ("b0.1", 1))]
    assert steps == 2 and len(history) == 1 and calls[-1] == ("epoch_end", 0)


def test_fit_without_hooks_is_the_plain_loop() -> None:
    """The retrain passes neither hook: the loop must not need them."""
    seen: list[int] = []
    scripted = iter([0.5, 0.9])
    history, steps = fit(
        nn.Linear(1, 1),
        1,
        lambda epoch: [None, None],  # type: ignore[misc]
        lambda batch, i: seen.append(i),
        lambda: {"auc": next(scripted), "logloss": 0.1, "positives": 10, "negatives": 10},
        EarlyStopping(1),
    )
    assert seen == [0, 1] and steps == 2 and history[0]["val_auc"] == 0.9
