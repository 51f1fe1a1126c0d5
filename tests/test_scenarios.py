import numpy as np
import pytest
import torch

from retain.config import ConfigError, ScenarioConfig
from retain.data import create_dataset
from retain.data.scenarios import create_scenario, make_class_order, task_sizes


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
    with pytest.raises(ConfigError, match="permutation"):
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
