import numpy as np
import pytest
import torch

from retain.config import ConfigError, ScenarioConfig
from retain.data import create_dataset
from retain.data.scenarios import Task, create_scenario, make_class_order, task_sizes


def test_python_order_matches_ln_tuning_cifar100_seed0():
    # METHODS.md: random.seed(0); random.shuffle(list(range(100))) -> task 1 = these ten classes
    order = make_class_order(100, ScenarioConfig(order_seed=0, order_rng="python"))
    assert order[:10] == [23, 8, 11, 7, 48, 13, 1, 91, 94, 54]


def test_torch_order_matches_global_manual_seed_randperm():
    torch.manual_seed(0)
    expected = torch.randperm(100).tolist()
    assert make_class_order(100, ScenarioConfig(order_seed=0, order_rng="torch")) == expected


def test_natural_and_explicit_orders():
    assert make_class_order(5, ScenarioConfig(order_seed=None)) == [0, 1, 2, 3, 4]
    assert make_class_order(3, ScenarioConfig(class_order=[2, 0, 1])) == [2, 0, 1]
    with pytest.raises(ConfigError, match="distinct class ids"):
        make_class_order(3, ScenarioConfig(class_order=[0, 0, 1]))


def test_task_sizes():
    assert task_sizes(100, ScenarioConfig(n_tasks=10)) == [10] * 10
    assert task_sizes(100, ScenarioConfig(n_tasks=6, first_task_classes=50)) == [50] + [10] * 5
    assert task_sizes(101, ScenarioConfig(n_tasks=11, classes_per_task=10)) == [10] * 10 + [1]
    assert task_sizes(10, ScenarioConfig(protocol="finetune")) == [10]
    with pytest.raises(ConfigError, match="do not split"):
        task_sizes(10, ScenarioConfig(n_tasks=3))
    with pytest.raises(ConfigError, match="gives 11 tasks but scenario.n_tasks=10"):
        task_sizes(101, ScenarioConfig(n_tasks=10, classes_per_task=10))


def _synthetic(n_classes=6, n=5):
    opts = dict(n_classes=n_classes, n_per_class=n, n_test_per_class=2, image_size=8)
    return create_dataset("synthetic", "train", **opts), create_dataset("synthetic", "test", **opts)


def test_labels_are_remapped_to_positions_in_the_class_order():
    train, test = _synthetic()
    cfg = ScenarioConfig(n_tasks=3, class_order=[5, 3, 1, 0, 2, 4])
    sc = create_scenario(train, test, cfg)
    assert [t.classes for t in sc.tasks] == [[5, 3], [1, 0], [2, 4]]
    assert [t.offset for t in sc.tasks] == [0, 2, 4]
    for task in sc.tasks:
        for j in range(len(task.train)):
            _, y = task.train[j]
            original = train.targets[task.train.indices[j]]
            assert y == cfg.class_order.index(original)
            assert y in task.labels
    assert sc.task_of_label().tolist() == [0, 0, 1, 1, 2, 2]
    assert sc.seen_classes(1) == 4 and sc.num_classes == 6
    assert len(sc.union_train(1)) == len(sc.tasks[0].train) + len(sc.tasks[1].train)


def test_use_tasks_and_fractions():
    train, test = _synthetic(n_classes=6, n=10)
    sc = create_scenario(train, test, ScenarioConfig(n_tasks=3, use_tasks=2, train_fraction=0.5))
    assert sc.n_tasks == 2 and sc.num_classes == 4
    assert all(len(t.train) == 2 * 5 for t in sc.tasks)  # half of 10 per class, 2 classes
    counts = np.bincount(sc.tasks[0].train.targets)
    assert counts.tolist() == [5, 5]


def _with_transforms(n_classes=4, n=50):
    train, test = _synthetic(n_classes=n_classes, n=n)
    train_aug = train.with_transform(lambda x: x.float() + 1000.0)  # stands in for augmentation
    train_eval = train.with_transform(lambda x: x.float())  # the deterministic test transform
    return train_aug, test, train_eval


def test_val_fraction_holds_out_a_seeded_per_class_fraction_over_the_test_transform():
    train, test, train_eval = _with_transforms(n_classes=4, n=50)
    cfg = ScenarioConfig(n_tasks=2, order_seed=None, val_fraction=0.1)
    sc = create_scenario(train, test, cfg, train_eval, seed=3)
    for task in sc.tasks:
        val, tr = task.val, task.train
        assert np.bincount(val.targets).tolist()[task.offset :] == [5, 5]  # 10% of 50 per class
        assert np.bincount(tr.targets).tolist()[task.offset :] == [45, 45]
        assert not set(val.indices) & set(tr.indices)
        assert (
            sorted(set(val.indices) | set(tr.indices)) == np.flatnonzero(np.isin(train.targets, task.classes)).tolist()
        )
        assert np.array_equal(task.train_eval.indices, tr.indices)
        assert val.base is train_eval and tr.base is train
        x, y = val[0]
        assert torch.equal(x, train_eval[int(val.indices[0])][0]) and x.max() <= 255  # test transform, not train's
        assert y == train.targets[val.indices[0]]  # natural order: label = class id
    again = create_scenario(train, test, cfg, train_eval, seed=3)
    other = create_scenario(train, test, cfg, train_eval, seed=4)
    assert all(np.array_equal(a.val.indices, b.val.indices) for a, b in zip(sc.tasks, again.tasks, strict=True))
    assert not np.array_equal(sc.tasks[0].val.indices, other.tasks[0].val.indices)
    # each task draws with its own seed (seed + 2000 + t): not the same positions within its 100 samples
    assert not np.array_equal(sc.tasks[0].val.indices, sc.tasks[1].val.indices - 100)


def test_val_fraction_zero_leaves_tasks_unchanged_and_small_classes_keep_a_train_sample():
    train, test, train_eval = _with_transforms(n_classes=4, n=50)
    for kw in (dict(), dict(train_fraction=0.3, test_fraction=0.5)):
        base = create_scenario(train, test, ScenarioConfig(n_tasks=2, **kw), train_eval, seed=1)
        zero = create_scenario(train, test, ScenarioConfig(n_tasks=2, val_fraction=0.0, **kw), train_eval, seed=1)
        for a, b in zip(base.tasks, zero.tasks, strict=True):
            assert b.val is None
            for name in ("train", "test", "train_eval"):
                assert np.array_equal(getattr(a, name).indices, getattr(b, name).indices)
        # the hold-out comes after train_fraction: 15 per class -> round(1.5) = 2 held out
        held = create_scenario(train, test, ScenarioConfig(n_tasks=2, val_fraction=0.1, **kw), train_eval, seed=1)
        for a, b in zip(base.tasks, held.tasks, strict=True):
            assert set(b.train.indices) | set(b.val.indices) == set(a.train.indices)
            if kw:
                assert np.bincount(b.val.targets).tolist()[b.offset :] == [2, 2]
    small_train, small_test = _synthetic(n_classes=2, n=2)
    sc = create_scenario(small_train, small_test, ScenarioConfig(n_tasks=1, val_fraction=0.01))
    assert np.bincount(sc.tasks[0].val.targets).tolist() == [1, 1]  # at least one per class ...
    sc = create_scenario(small_train, small_test, ScenarioConfig(n_tasks=1, val_fraction=0.9))
    assert np.bincount(sc.tasks[0].train.targets).tolist() == [1, 1]  # ... and at least one left to train on


def test_val_fraction_is_validated_and_task_keeps_positional_construction():
    train, test = _synthetic()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"scenario.val_fraction"):
            create_scenario(train, test, ScenarioConfig(n_tasks=3, val_fraction=bad))
    task = Task(0, [0, 1], 0, train, test, train)
    assert task.val is None
