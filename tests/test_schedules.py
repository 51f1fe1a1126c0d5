import copy
import json
import math

import pytest
import torch
from torch import nn

from retain.config import ConfigError, TrainConfig
from retain.engine.schedules import Schedule, build_schedule


def reference_scheduler(opt: torch.optim.Optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: int):
    """The engine's former ``build_scheduler`` (retain/engine.py), verbatim: the bit-exact reference."""
    warmup = train.warmup_steps or round(train.warmup_epochs * steps_per_epoch)
    base = opt.param_groups[0]["lr"]
    floor = train.min_lr / base if base > 0 else 0.0
    if train.schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.schedule={train.schedule!r}; valid: constant, cosine")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _opt(lr: float = 0.05, model: nn.Module | None = None) -> torch.optim.Optimizer:
    model = model if model is not None else nn.Linear(3, 2)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _lrs(opt: torch.optim.Optimizer, sched, n: int) -> list[float]:
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(n):
        opt.step()  # no grads: a no-op that keeps LambdaLR's call-order check quiet
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(
    "kw, steps_per_epoch, total, run",
    [
        (dict(schedule="constant"), 7, 35, 35),
        (dict(schedule="constant", warmup_steps=5), 7, 35, 35),
        (dict(schedule="constant", warmup_epochs=0.5), 7, 35, 35),
        (dict(schedule="cosine"), 7, 35, 35),
        (dict(schedule="cosine", warmup_epochs=1.5), 7, 35, 35),
        (dict(schedule="cosine", warmup_steps=4, min_lr=1e-3), 10, 50, 50),
        (dict(schedule="cosine", min_lr=1e-4, lr=0.3), 3, 20, 26),  # runs past total_steps: stays at min_lr
        (dict(schedule="cosine", warmup_steps=40), 3, 20, 30),  # warm-up longer than the stage
    ],
)
def test_constant_and_cosine_are_bit_identical_to_the_old_build_scheduler(kw, steps_per_epoch, total, run):
    train = TrainConfig(**kw)
    old_opt, new_opt = _opt(train.lr), _opt(train.lr)
    old = _lrs(old_opt, reference_scheduler(old_opt, train, total, steps_per_epoch), run)
    new_sched = build_schedule(new_opt, train, steps_per_epoch, total)
    new = _lrs(new_opt, new_sched, run)
    assert new == old  # exact float equality, step by step
    assert new_sched.lr == old[-1]
    model = nn.Linear(3, 2)
    for _ in range(3):
        assert new_sched.end_epoch(model, None) is False  # no validation needed, never stops
    new_sched.finish(model)


def _plateau(lr=0.01, model=None, **kw) -> tuple[nn.Module, torch.optim.Optimizer, Schedule]:
    model = model if model is not None else nn.Linear(3, 2)
    opt = _opt(lr, model)
    return model, opt, build_schedule(opt, TrainConfig(schedule="plateau", lr=lr, **kw), 4, 40)


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _value(model: nn.Module) -> float:
    values = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(values) == 1
    return values.pop()


def test_plateau_divides_the_lr_after_patience_non_improving_epochs():
    model, opt, sched = _plateau(lr=0.01, patience=3, lr_factor=3.0)
    lrs = []
    for loss in [1.0, 1.1, 1.2, 1.3, 0.9, 0.95, 0.99, 1.0]:
        for _ in range(4):
            opt.step()
            sched.step()
        assert sched.end_epoch(model, loss) is False
        lrs.append(sched.lr)
    # epochs 2-4 do not improve on 1.0 -> divided after the 3rd; 0.9 resets the counter; 6-8 -> divided again
    assert lrs == [0.01, 0.01, 0.01, 0.01 / 3, 0.01 / 3, 0.01 / 3, 0.01 / 3, 0.01 / 3 / 3]
    assert all(g["lr"] == lrs[-1] for g in opt.param_groups)
    assert sched.best_loss == 0.9


def test_plateau_restores_the_best_weights_on_decay_and_at_finish():
    model, _, sched = _plateau(patience=2)
    for epoch, loss in enumerate([1.0, 0.5, 0.9, 0.8]):
        _fill(model, float(epoch))  # "training" this epoch
        sched.end_epoch(model, loss)
    assert sched.lr == 0.01 / 3
    assert _value(model) == 1.0  # epoch 1 had the lowest loss; reloaded at the decay
    _fill(model, 7.0)
    sched.end_epoch(model, 0.4)  # new best: the copy is a clone, not a view of the live weights
    _fill(model, 9.0)
    sched.finish(model)
    assert _value(model) == 7.0


def test_plateau_without_restore_best_keeps_the_current_weights():
    model, _, sched = _plateau(patience=2, restore_best=False)
    for epoch, loss in enumerate([1.0, 0.5, 0.9, 0.8]):
        _fill(model, float(epoch))
        sched.end_epoch(model, loss)
    assert sched.lr == 0.01 / 3
    assert _value(model) == 3.0
    _fill(model, 9.0)
    sched.finish(model)
    assert _value(model) == 9.0


def test_plateau_stops_when_the_lr_would_fall_below_stop_lr():
    # lr 0.01, factor 3, stop 1e-4: 0.01/3**4 = 1.23e-4 is still allowed, 0.01/3**5 = 4.1e-5 stops (5th decay)
    model, _, sched = _plateau(lr=0.01, patience=2, lr_factor=3.0, stop_lr=1e-4)
    losses = [1.0] + [2.0] * 20
    lrs, stops = [], []
    for epoch, loss in enumerate(losses):
        _fill(model, float(epoch))
        stop = sched.end_epoch(model, loss)
        lrs.append(sched.lr)
        stops.append(stop)
        if stop:
            break
    lr, expected = 0.01, [0.01]
    for _ in range(4):
        expected += [lr, lr / 3]  # patience 2: one waiting epoch, then the division
        lr /= 3
    expected += [lr, lr]  # the 5th decay stops the stage and leaves the lr alone (FACIL)
    assert lrs == expected
    assert stops == [False] * 10 + [True] and len(lrs) == 11
    assert _value(model) == 10.0  # the stop itself leaves the weights to finish()
    sched.finish(model)
    assert _value(model) == 0.0
    assert sched.end_epoch(model, 0.1) is True  # stays stopped


def test_plateau_warmup_is_a_per_step_multiplier_on_the_current_lr():
    model, opt, sched = _plateau(lr=0.01, patience=1, warmup_steps=4)
    lrs = _lrs(opt, sched, 2)
    assert lrs == [0.01 * 1 / 4, 0.01 * 2 / 4, 0.01 * 3 / 4]
    sched.end_epoch(model, 1.0)
    sched.end_epoch(model, 2.0)  # decay inside the warm-up: the multiplier applies to the divided lr
    assert sched.lr == (0.01 / 3) * 3 / 4
    assert _lrs(opt, sched, 3)[1:] == [0.01 / 3] * 3


def test_plateau_needs_a_validation_loss_and_valid_settings():
    model, _, sched = _plateau()
    with pytest.raises(ValueError, match=r"train.schedule=plateau needs a validation split: set scenario.val_fr"):
        sched.end_epoch(model, None)
    with pytest.raises(ConfigError, match="train.patience"):
        _plateau(patience=0)
    with pytest.raises(ConfigError, match="train.lr_factor"):
        _plateau(lr_factor=1.0)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="train.schedule='step'; valid: constant, cosine, plateau"):
        build_schedule(_opt(), TrainConfig(schedule="step"), 10, 100)


def _json_state(sched: Schedule) -> dict:
    state = sched.state_dict()
    best = state.pop("best_state")
    state = json.loads(json.dumps(state))  # all but the best weights survive JSON
    state["best_state"] = best
    return state


def test_cosine_state_round_trip_continues_identically():
    train = TrainConfig(schedule="cosine", warmup_steps=6, min_lr=1e-3, lr=0.1)
    opt = _opt(0.1)
    sched = build_schedule(opt, train, 5, 40)
    _lrs(opt, sched, 17)
    state = _json_state(sched)
    rest = _lrs(opt, sched, 30)
    opt2 = _opt(0.1)
    sched2 = build_schedule(opt2, train, 5, 40)
    sched2.load_state_dict(state)
    assert _lrs(opt2, sched2, 30) == rest


def _plateau_epochs(model, opt, sched, losses, weights, finish=True):
    out = []
    for loss, w in zip(losses, weights, strict=True):
        for _ in range(4):
            opt.step()
            sched.step()
        _fill(model, w)
        stop = sched.end_epoch(model, loss)
        out.append((sched.lr, stop, _value(model)))
        if stop:
            break
    if finish:
        sched.finish(model)
    return out, _value(model)


def test_plateau_state_round_trip_continues_identically():
    kw = dict(patience=2, lr_factor=2.0, stop_lr=1e-3, warmup_steps=6)
    losses = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.72, 0.71, 0.9, 0.95, 0.99, 1.0, 1.1, 1.2]
    weights = [float(i) for i in range(len(losses))]
    model, opt, sched = _plateau(lr=0.01, **kw)
    first, _ = _plateau_epochs(model, opt, sched, losses[:3], weights[:3], finish=False)  # interrupted here
    saved_model, saved_opt, state = copy.deepcopy(model), copy.deepcopy(opt.state_dict()), _json_state(sched)
    rest, final = _plateau_epochs(model, opt, sched, losses[3:], weights[3:])

    model2 = saved_model
    opt2 = _opt(0.01, model2)
    opt2.load_state_dict(saved_opt)
    sched2 = build_schedule(opt2, TrainConfig(schedule="plateau", lr=0.01, **kw), 4, 40)
    sched2.load_state_dict(state)
    rest2, final2 = _plateau_epochs(model2, opt2, sched2, losses[3:], weights[3:])
    assert rest2 == rest and final2 == final
    assert any(stop for _, stop, _ in rest)  # the continuation covers decays and the stop
    assert len({lr for lr, _, _ in first + rest}) >= 3
