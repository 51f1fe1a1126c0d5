"""LayerNorm tuning with task keys (De Min et al., "On the Effectiveness of LayerNorm Tuning for Continual Learning
in Vision Transformers", ICCVW 2023).

Trained per task: one (scale, bias) row in each of the ViT's LayerNorms (38,400 values for ViT-B/16), one key, a
throwaway head (LN stage) and the task's rows of the real head (classifier rectification). Frozen: everything else.
At test the frozen pre-trained ViT's CLS token picks the task whose key is most cosine-similar; that task's LN rows
and the real head over all seen classes give the logits.

Per task (two-stage variant): (1a) key, (1b) LN rows with the oracle task id and a throwaway head, logits masked to
the task's classes, (2) the real head on features from the test-time selection, logits masked to the task's classes.
Beyond the original (each an option): closed-form keys, one pass for batches mixing tasks, frozen-model queries
cached per image, stage 2 on cached features. A run's artefact (``retain export``, ``run.export_each_task``) holds
only the task-specific tensors.

Precision: queries, key similarities, the argmax and the logits are float32 whatever the run's autocast, so a
near-tie routes alike in stage 2 and at test. Outside the method's own passes the backbone is the pre-trained ViT
(its training route is ``PRETRAINED``; task rows are routed explicitly wherever they are meant).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from retain import distributed
from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Prediction, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.models.continual import head_prefix
from retain.models.query import QueryService, frozen_cls, key_similarity
from retain.models.task_layernorm import PRETRAINED, SelectTask, copy_task_rows, inject_task_layernorm, task_layernorms

__all__ = ["LNTuningConfig", "LNTuning", "key_loss", "select_task", "closed_form_key", "similarity_weights"]

VARIANTS = ("two_stage", "single_stage")
HEAD_FEATURES = ("cached", "online")
QUERY_MODELS = ("shared", "copy")
SIM_WEIGHTS = ("official", "uniform")


@dataclass
class LNTuningConfig(MethodConfig):
    name: str = "ln_tuning"
    train_mask: str = "current"  # LN and head stages: CE over the current task's classes (the original's mask)
    variant: str = "two_stage"  # two_stage: task keys on the frozen ViT's CLS | single_stage: per-layer keys
    key_epochs: int | None = None  # stage 1a when keys are trained; None: train.epochs (the original's --epochs)
    head_epochs: int = 5  # stage 2, classifier rectification (--epochs_unbiased)
    head_lr: float = 0.001  # stage 2 Adam lr (--lr_unbiased; not rescaled by batch/256)
    rectify: bool = True  # run stage 2 (--unbiased)
    closed_form_keys: bool = True  # key = normalised mean of normalised queries, one pass; False: 1a by Adam
    cache_queries: bool = True  # frozen-model CLS of each deterministic image computed once per run
    head_features: str = "cached"  # cached: stage 2 on train_eval features made once | online: augmented, per step
    mixed_batch: bool = True  # one pass with per-sample LN rows; False: split the batch by task
    query_model: str = "shared"  # shared: same backbone with the pre-trained LN row | copy: a frozen deepcopy
    sim_weight: float = 1.0  # single_stage: weight of the key-similarity term
    sim_weights: str = "official"  # single_stage: official = mean per block, then over blocks + final norm | uniform


def _fp32(t: torch.Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device: what runs inside is float32 (given float32 inputs) whatever the run's amp."""
    return torch.autocast(t.device.type, enabled=False)


def key_loss(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``-mean_i cos(query_i, key)`` for queries (B, D) and one key (D,), in float32."""
    with _fp32(query):
        return -(F.normalize(query.float(), dim=-1) @ F.normalize(key.float(), dim=0)).mean()  # (B,) -> ()


def select_task(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B,) index of the key (rows of (K, D)) most cosine-similar to each query (B, D); float32 whatever the
    autocast (a bf16 matmul would round near-ties differently from the float32 selection of stage 2)."""
    return key_similarity(query, keys).argmax(dim=1)  # (B,)


def closed_form_key(query: torch.Tensor) -> torch.Tensor:
    """(D,) the unit key minimising ``key_loss`` over queries (B, D): the normalised mean of normalised queries."""
    with _fp32(query):
        return F.normalize(F.normalize(query.float(), dim=-1).sum(0), dim=0)


def similarity_weights(names: list[str], scheme: str = "official") -> list[float]:
    """Weight of each LayerNorm's similarity (``names`` in forward order) in the single-stage term; they sum to 1.

    ``official``: the LNs of a block (``blocks.<i>.*``) share one group, every other LN is a group of its own; the
    term is the mean over groups of the mean within each group, as the official code (per block ``(norm1 +
    norm2) / 2``, summed over blocks and the final norm, divided by blocks + 1): 1/26 per block LN and 1/13 for the
    final norm in ViT-B/16. ``uniform``: 1/L for each of the L layers.
    """
    if scheme == "uniform":
        return [1.0 / len(names)] * len(names)
    groups = [m.group(0) if (m := re.match(r"blocks\.\d+\.", n)) else n for n in names]
    sizes = Counter(groups)
    return [1.0 / (len(sizes) * sizes[g]) for g in groups]


@register_method
class LNTuning(PerTaskMethod):
    """Per-task LayerNorm rows selected by task keys; see the module docstring."""

    config_class = LNTuningConfig
    selects_task = True  # per-task rows in every protocol (task-IL evaluation uses the oracle task's rows)

    def __init__(self, cfg: LNTuningConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg)
        n_tasks, dim = scenario.n_tasks, model.backbone.num_features
        self.query_model = None
        if cfg.query_model == "copy" and cfg.variant == "two_stage":
            self.query_model = copy.deepcopy(model.backbone).eval().requires_grad_(False)
        self.single_stage = cfg.variant == "single_stage"
        names = inject_task_layernorm(model.backbone, n_tasks, selector=self.single_stage)
        self.layers = task_layernorms(model.backbone)
        self.sim_weights = similarity_weights(names, cfg.sim_weights)  # single stage: per layer, in self.layers order
        if not self.single_stage:
            device = self.layers[0].ln_weight.device
            keys = nn.init.orthogonal_(torch.empty(n_tasks, dim, device=device))  # (T, D), own key per task
            model.register_parameter("ln_keys", nn.Parameter(keys))
        model.add_module("ln_fake_head", copy.deepcopy(model.head))  # throwaway head of the LN stage (all active)
        self.row_tables = frozenset([*self.ln_param_names(), *([] if self.single_stage else ["ln_keys"])])
        self.query = QueryService(self._frozen_cls)  # q(x), cached per image (retain.models.query)

    # ---- parameters -----------------------------------------------------------------------------------------------
    def ln_param_names(self) -> list[str]:
        """Full names of the per-task tables: ``backbone.<layer>.ln_weight``, ``ln_bias`` (single-stage: ``ln_key``,
        ``ln_att``)."""
        return [
            f"backbone.{n}" for n, _ in self.model.backbone.named_parameters() if n.rsplit(".", 1)[-1][:3] == "ln_"
        ]

    def owned(self, t: int) -> list[str]:
        """Every per-task table (task t owns row t of each): LN scale and bias (single stage: keys and attention
        vectors too) and, in the two-stage variant, the task keys."""
        return sorted(self.row_tables)

    def trainable_prefixes(self, task: Task) -> list[str]:
        return [*super().trainable_prefixes(task), "ln_fake_" + head_prefix(task.index)]

    def training_route(self) -> int:
        return PRETRAINED

    def param_breakdown(self, task: Task) -> dict[str, int]:
        """Values stored for ``task`` alone (``task_state``): its row of every LN table, its key, its head rows."""
        out = {"ln": 0, "key": 0, "head": 0}
        for name, v in self.task_state(task).items():
            out["head" if name.startswith("head.") else "key" if name == "ln_keys" else "ln"] += v.numel()
        return out

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)  # routed to the pre-trained rows
        if task.index > 0:
            copy_task_rows(self.model.backbone, task.index - 1, task.index)  # keys stay fresh (--new_key)
        if not self.single_stage and self.cfg.closed_form_keys:
            self.fit_key(task)

    def stages(self, task: Task) -> list[Stage]:
        t, train = task.index, self.train_cfg
        stages = []
        if not self.single_stage:  # 0 epochs when fitted in closed form (before_task); kept so that the LN stage is
            # stage 1 in both schedules and the engine shuffles its batches alike
            epochs = train.epochs if self.cfg.key_epochs is None else self.cfg.key_epochs
            stages.append(Stage("keys", 0 if self.cfg.closed_form_keys else epochs, ["ln_keys"], weight_decay=0.0,
                                loss=self.key_stage_loss))  # fmt: skip
        ln_params = [*self.ln_param_names(), "ln_fake_" + head_prefix(t)]
        stages.append(Stage("ln", train.epochs, ln_params, weight_decay=0.0))  # wd would move the old rows
        if self.cfg.rectify:
            data = (lambda: self._head_features(task)) if self.cfg.head_features == "cached" else None
            stages.append(Stage("head", self.cfg.head_epochs, [head_prefix(t)], lr=self.cfg.head_lr,
                                optimizer="adam", weight_decay=0.0, data=data, loss=self.head_stage_loss))  # fmt: skip
        return stages

    def key_stage_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Stage 1a: the current task's key towards the frozen model's CLS of its images."""
        return {"key": key_loss(self.queries(batch[0], cache=False), self.model.ln_keys[self.task.index])}

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        """Stage 1b: the current task's LN rows (oracle task id) and throwaway head; single stage: + similarity."""
        x, y = batch
        with self.routed(self.task.index):
            logits = self.mask_logits(_logits(self.model.ln_fake_head, self.model.features(x)))  # (B, C)
        terms = {"ce": self.ce(logits, y)}
        if self.single_stage:
            terms["sim"] = -self.cfg.sim_weight * self.similarity_term()
        return terms

    def head_stage_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Stage 2: the real head on features from the test-time selection (cached, or per augmented batch)."""
        x, y = batch
        feats = x if self.cfg.head_features == "cached" else self._online_head_features(x, self.task.index)  # (B, D)
        logits = self.mask_logits(_logits(self.model.head, feats))  # (B, C)
        return {"ce": self.ce(logits, y)}

    def similarity_term(self) -> torch.Tensor:
        """Single stage: sum over layers of ``sim_weights[l] * mean_i cos(att_t * cls_i, key_t)`` of the last oracle
        pass (float32), the term the LN stage maximises."""
        sims = torch.stack([m.similarity.float().mean() for m in self.layers])  # (L,)
        return (sims * sims.new_tensor(self.sim_weights)).sum()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits over all seen classes with the selected task's rows, and the selected task ids (B,)."""
        if task_id is not None:  # task-incremental: the oracle task's rows
            with self.routed(task_id):
                return Prediction(_logits(self.model.head, self.model.features(x)))
        upto = self.task.index if self.task is not None else 0
        feats, ids = self.inference_features(x, upto, cache=self.cfg.cache_queries)
        return Prediction(_logits(self.model.head, feats), ids)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) as deployed, for the retention probe: the pre-trained rows before the first task, afterwards
        the test-time routing among the tasks seen so far (never task 0's rows by default)."""
        if self.task is None:
            with self.routed(PRETRAINED):
                return self.model.features(x)
        return self.inference_features(x, self.task.index, cache=False)[0]

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.query.clear()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Keys, every LN table, both heads: everything not rebuilt from the pre-trained backbone."""
        state = self.model.state_dict()
        return {k: v for k, v in state.items() if k.startswith(("head.", "ln_")) or ".ln_" in k}

    def deployed_state(self) -> dict[str, torch.Tensor]:
        """As ``checkpoint_state`` without the throwaway head of the LN stage."""
        return {k: v for k, v in super().deployed_state().items() if not k.startswith("ln_fake_head.")}

    # ---- task selection -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def queries(self, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """(B, D) CLS token of the frozen pre-trained ViT after its final norm, float32 whatever the autocast
        (cached per image if ``cache``): ``self.query``."""
        return self.query(x, cache)

    @property
    def query_cache(self) -> dict[bytes, torch.Tensor]:
        return self.query.cache

    @property
    def frozen_images(self) -> int:
        return self.query.frozen_images

    def _frozen_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) the query pass: the frozen copy, or the shared backbone with the pre-trained LN rows."""
        if self.query_model is not None:
            return frozen_cls(self.query_model)(x)
        with self.routed(PRETRAINED):
            return frozen_cls(self.model.backbone)(x)

    @torch.no_grad()
    def select(self, x: torch.Tensor, upto: int, cache: bool = True) -> torch.Tensor:
        """(B,) task ids: argmax over keys 0..upto of the cosine to the frozen model's CLS (two-stage variant)."""
        return select_task(self.queries(x, cache), self.model.ln_keys[: upto + 1])

    def task_features(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, D) features of each sample with its own task's LN rows: one pass, or one per task (``mixed_batch``)."""
        if self.cfg.mixed_batch:
            with self.routed(ids):
                return self.model.features(x)
        out = None
        for t in ids.unique().tolist():
            rows = ids == t
            with self.routed(t):
                f = self.model.features(x[rows])  # (b, D)
            out = f.new_empty(len(x), f.shape[1]) if out is None else out
            out[rows] = f
        return out

    @torch.no_grad()
    def inference_features(self, x: torch.Tensor, upto: int, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Features with the test-time selection among tasks 0..upto, and the selected ids (B,).

        Single-stage: every layer selects on its own; the ids reported are the final norm's.
        """
        if self.single_stage:
            with self.routed(SelectTask(upto)):
                feats = self.model.features(x)  # (B, D)
            return feats, self.layers[-1].selected
        ids = self.select(x, upto, cache)
        return self.task_features(x, ids), ids

    # ---- keys and stage-2 data ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_key(self, task: Task) -> None:
        """Closed-form key of ``task`` from one pass over its training images (deterministic transform); under
        several processes each sums its shard and the sums are added (the key is then the same on every one)."""
        total = None
        for x, _ in self.loader(task.train_eval):
            q = F.normalize(self.queries(x.to(self.device), self.cfg.cache_queries).float(), dim=-1)  # (B, D)
            total = q.sum(0) if total is None else total + q.sum(0)
        if distributed.active():
            total = total if total is not None else self.model.ln_keys.new_zeros(self.model.ln_keys.shape[1])
            total = distributed.all_reduce_sum(total.float())  # (D,)
        self.model.ln_keys[task.index].copy_(F.normalize(total, dim=0))

    @torch.no_grad()
    def _head_features(self, task: Task) -> TensorDataset:
        """(features, labels) of ``task.train_eval`` with the test-time selection, computed once for stage 2 (shards
        gathered under several processes, as every ``extract_features`` pass)."""
        return self.extract_features(
            task.train_eval, forward=lambda x: self.inference_features(x, task.index, self.cfg.cache_queries)[0]
        )

    @torch.no_grad()
    def _online_head_features(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Stage 2 as the original: the augmented batch goes through selection and the tuned model every step."""
        was_training = self.model.training
        self.model.eval()
        feats, _ = self.inference_features(x, upto, cache=False)
        self.model.train(was_training)
        return feats


def _logits(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 logits of ``head`` on features (B, D), whatever the autocast (the head is one small matmul)."""
    with _fp32(feats):
        return head(feats.float())


def _check(cfg: LNTuningConfig) -> None:
    for key, value, valid in (("variant", cfg.variant, VARIANTS), ("head_features", cfg.head_features, HEAD_FEATURES),
                              ("query_model", cfg.query_model, QUERY_MODELS),
                              ("sim_weights", cfg.sim_weights, SIM_WEIGHTS)):  # fmt: skip
        if value not in valid:
            raise ConfigError(f"method.{key}={value!r}; valid: {', '.join(valid)}")
