"""PEFT-ViT (Bafghi et al., CVPRW 2024): cost of LoRA and Block Expansion steps against plain timm ViTs, on CPU.

Ratios are (reference time) / (our time), so >= 1 means ours is at least as fast. Each round times every variant once,
in a rotating order; a round's ratio compares the two variants of a comparison, and the script prints the median
over rounds (and the median times). "ours" is the method as the engine runs it (``Method.loss`` + backward + SGD
step; ``predict`` inside ``deployed()``), built through ``build_method`` on the fine-tuning protocol.

Goals (issue 9): train steps >= 0.9 against a plain timm step with the same number of trainable parameters;
merged-LoRA inference >= 0.98 against the plain model. The other rows are for information.

    nice -n 10 python benchmarks/peft_vit_speed.py                       # vit_tiny_patch4_32, batch 64, 1 thread
    python benchmarks/peft_vit_speed.py --backbone vit_micro_patch4_32 --rounds 30 --threads 2
    python benchmarks/peft_vit_speed.py --small                          # the suite's size (benchmarks/run.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import head_step, loss_step, measure, parse_sized
from retain.config import load_config, load_yaml
from retain.engine.build import build_method, build_model
from retain.inspect import dry_scenario
from retain.methods.base import Method, mark_trainable
from retain.models import create_backbone

N_CLASSES = 10
SMALL = {"backbone": "vit_micro_patch4_32", "batch": 16, "rounds": 9, "warmup": 2}


def build(backbone: str, method: list[str], kwargs: str = "{}") -> Method:
    """A method on the fine-tuning protocol (one task of 10 classes), random backbone weights (seed 0)."""
    over = [f"model.backbone={backbone}", "model.pretrained=false", f"model.kwargs={kwargs}", "data.name=synthetic",
            "scenario.protocol=finetune", *method]  # fmt: skip
    cfg = load_config(None, over)
    scenario = dry_scenario(cfg)
    torch.manual_seed(0)
    return build_method(cfg, build_model(cfg, scenario), scenario)


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def method_step(method: Method, x: torch.Tensor, y: torch.Tensor, cached: bool = False) -> Callable[[], None]:
    """One engine training step of ``method`` (its first stage's parameters); ``cached``: on prefix tokens."""
    task = method.scenario.tasks[0]
    method.before_task(task)
    stage = method.stages(task)[0]
    stage.loss = method.cached_prefix_loss if cached else None
    mark_trainable(method.model, stage.params)
    opt = sgd([p for p in method.model.parameters() if p.requires_grad])
    inputs = method.prefix_tokens(x).detach() if cached else x  # (B, L, D) or (B, 3, H, W)
    method.model.train()
    return loss_step(method, opt, inputs, y, stage)


def plain_step(model: nn.Module, head: nn.Linear, names: list[str], x, y) -> tuple[Callable[[], None], int]:
    """A plain timm ViT step training the parameters whose names start with ``names`` (and the head); ``model``
    is this step's own (its ``requires_grad`` flags are set here)."""
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.startswith(tuple(names))]
    for p in params:
        p.requires_grad_(True)
    opt = sgd([*params, *head.parameters()])
    model.train()
    n_trained = sum(p.numel() for p in params) + sum(p.numel() for p in head.parameters())
    return head_step(model, head, opt, x, y), n_trained


def bitfit_names(model: nn.Module) -> list[str]:
    """Every bias and LayerNorm affine of the blocks: a plain set of small tensors in every block, like LoRA's."""
    return [n for n, p in model.named_parameters() if n.startswith("blocks.") and (n.endswith("bias") or ".norm" in n)]


def trained(method: Method) -> int:
    return sum(p.numel() for p in method.model.parameters() if p.requires_grad)


def build_cases(backbone: str, batch: int, rank: int, kwargs: str = "{}", only: str | None = None) -> tuple:
    """Comparisons {reference name: fn, ours name: fn} and a line per comparison on what is trained; ``only``:
    just LoRA's rows or just Block Expansion's."""
    torch.manual_seed(0)
    extra = load_yaml(kwargs) or {}
    plain = create_backbone(backbone, pretrained=False, **extra)
    size = plain.patch_embed.img_size
    x, y = torch.rand(batch, 3, *size), torch.randint(0, N_CLASSES, (batch,))  # (B, 3, H, W), (B,)
    notes, cases = [], {}
    if only != "block":
        _lora_cases(cases, notes, backbone, kwargs, plain, rank, x, y)
    if only != "lora":
        _block_cases(cases, notes, backbone, kwargs, plain, extra, x, y)
    return cases, notes


def _lora_cases(cases: dict, notes: list, backbone: str, kwargs: str, plain: nn.Module, rank: int, x, y) -> None:
    dim = plain.num_features
    lora = build(backbone, ["method.name=lora", f"method.r={rank}"], kwargs)
    lora_step = method_step(lora, x, y)
    ref, n_ref = plain_step(copy.deepcopy(plain), nn.Linear(dim, N_CLASSES), bitfit_names(plain), x, y)
    cases[f"LoRA r={rank} train step vs plain (biases + LNs trainable)"] = {"plain": ref, "lora": lora_step}
    notes.append(f"LoRA r={rank}: {trained(lora):,} trainable; plain biases + LNs of every block + head: {n_ref:,}")
    merged = build(backbone, ["method.name=lora", f"method.r={rank}"], kwargs)  # its own: deployed for inference
    unmerged = build(backbone, ["method.name=lora", f"method.r={rank}"], kwargs)
    merged_fn, plain_fn = _inference(merged, plain, x, deploy=True)
    unmerged_fn, _ = _inference(unmerged, plain, x, deploy=False)
    cases["merged-LoRA inference vs plain ViT"] = {"plain": plain_fn, "merged LoRA": merged_fn}
    cases["un-merged (peft) LoRA inference vs plain ViT (info)"] = {"plain": plain_fn, "un-merged LoRA": unmerged_fn}


def _block_cases(cases: dict, notes: list, backbone: str, kwargs: str, plain: nn.Module, extra: dict, x, y) -> None:
    depth, dim = len(plain.blocks), plain.num_features
    for split in (depth, depth // 2):
        uncached = ["method.name=block_expansion", f"method.split={split}", "method.cache_prefix=false"]
        be = build(backbone, uncached, kwargs)
        be_step, p = method_step(be, x, y), len(be.new_blocks)
        deep = create_backbone(backbone, pretrained=False, **(extra | {"depth": depth + p}))
        ref, n_ref = plain_step(deep, nn.Linear(dim, N_CLASSES), [f"blocks.{i}." for i in be.new_blocks], x, y)
        name = f"Block exp. p={p} train step vs plain depth-{depth + p} ViT, same blocks"
        cases[name] = {"plain": ref, "ours": be_step}
        notes.append(f"Block exp. p={p} (split {split}, new blocks {be.new_blocks}): {trained(be):,} trainable; "
                     f"plain: {n_ref:,}")  # fmt: skip
        if p == 1:
            top, n_top = plain_step(copy.deepcopy(plain), nn.Linear(dim, N_CLASSES), [f"blocks.{depth - 1}."], x, y)
            cases["Block exp. p=1 train step vs plain top-1 fine-tuning (info)"] = {"top-1": top, "ours": be_step}
            notes.append(f"top-1 fine-tuning of the depth-{depth} ViT (the paper's top-p): {n_top:,} trainable")
        be_cached = build(backbone, ["method.name=block_expansion", f"method.split={split}"], kwargs)
        cases[f"Block exp. p={p} step on cached prefix tokens vs uncached (info)"] = {
            "uncached": be_step, "cached": method_step(be_cached, x, y, cached=True)}  # fmt: skip


def _inference(lora: Method, plain: nn.Module, x: torch.Tensor, deploy: bool) -> tuple[Callable[[], None], ...]:
    """(LoRA predict, plain forward) in eval mode; ``deploy``: inside ``deployed()`` (q/k/v fused, B A merged)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02)  # a trained adapter: B != 0
    lora.model.eval()
    deployed = ExitStack()  # with ``deploy``, the method stays deployed while ``merged`` lives (it holds the stack)
    if deploy:
        deployed.enter_context(lora.deployed())
    plain.eval()
    head = nn.Linear(plain.num_features, N_CLASSES)

    @torch.no_grad()
    def merged() -> None:
        lora.predict(x)

    merged.deployed = deployed

    @torch.no_grad()
    def reference() -> None:
        head(plain.forward_head(plain.forward_features(x), pre_logits=True))

    return merged, reference


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vit_tiny_patch4_32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kwargs", default="{}", help="timm kwargs, e.g. '{embed_dim: 384, num_heads: 6}'")
    parser.add_argument("--only", choices=["lora", "block"], default=None, help="only these rows")
    return parse_sized(parser, argv, SMALL)


def collect(argv: list[str] | None = None) -> dict:
    """The comparisons and what each trains, as a results-file entry (``benchmarks/run.py``)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cases, notes = build_cases(args.backbone, args.batch, args.rank, args.kwargs, args.only)
    rows = measure(cases, args.rounds, args.warmup)
    settings = {k: getattr(args, k) for k in ("backbone", "kwargs", "batch", "rank", "rounds", "warmup", "threads",
                                              "only")}  # fmt: skip
    return {"settings": settings, "ratio": "reference time / ours (>= 1: ours not slower)", "notes": notes,
            "rows": [r._asdict() for r in rows]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    res = collect(argv)
    s = res["settings"]
    print(f"{s['backbone']} {s['kwargs']}, batch {s['batch']}, {s['threads']} thread(s), {s['rounds']} rounds, torch "
          f"{torch.__version__}")  # fmt: skip
    print("\n".join(f"  {n}" for n in res["notes"]))
    print("\n| comparison | reference | ours | ratio |\n|---|---|---|---:|")
    for r in res["rows"]:
        print(f"| {r['case']} | {r['ref']} {1e3 * r['ref_s']:.1f} ms | {r['ours']} {1e3 * r['ours_s']:.1f} ms | "
              f"{r['ratio']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
