"""The preprocessing pipeline: oracle -> library -> experts -> pool bundle.

Every phase leaves its result in a work directory (`<phase>.safetensors` plus
`<phase>.json` with its figures) and a checkpoint while it runs, so an interrupted
extraction resumes where it stopped and a finished phase is never trained twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poe_core.checkpoint import remove_checkpoint
from poe_core.data import Splits
from poe_core.device import machine_summary, pick_device, resolve_precision
from poe_core.nets import ExpertHead, WideResNet, WRNSpec, count_flops, count_params, expert_head
from poe_core.train import (
    PhaseResult,
    ProgressFn,
    TrainConfig,
    train_experts,
    train_library,
    train_oracle,
)

log = logging.getLogger(__name__)

PHASES = ("oracle", "library", "experts")


@dataclass
class ExtractionPlan:
    oracle_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 4, 4))
    library_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 1, 1))
    expert_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 1, 0.25))
    oracle_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(label_smoothing=0.1))
    library_cfg: TrainConfig = field(default_factory=TrainConfig)
    expert_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.05))
    tasks: Sequence[str] | None = None  # None: every primitive task of the taxonomy
    oracle_with_val: bool = False  # train the oracle on the validation images too (see train_oracle)


def _save_phase(work: Path, phase: str, state: dict[str, torch.Tensor], info: dict) -> None:
    tmp = work / f"{phase}.safetensors.tmp"
    save_file({k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.cpu()
               for k, v in state.items()}, str(tmp))
    os.replace(tmp, work / f"{phase}.safetensors")
    (work / f"{phase}.json.tmp").write_text(json.dumps(info, indent=2))
    os.replace(work / f"{phase}.json.tmp", work / f"{phase}.json")


def phase_done(work: Path, phase: str) -> bool:
    return (work / f"{phase}.json").is_file() and (work / f"{phase}.safetensors").is_file()


def phase_info(work: Path, phase: str) -> dict:
    return json.loads((work / f"{phase}.json").read_text())


def _figures(result: PhaseResult, cfg: TrainConfig, spec: WRNSpec) -> dict:
    return {
        "architecture": spec.to_dict(), "config": cfg.to_dict(), "epochs": result.epochs,
        "precision": resolve_precision(cfg.precision, pick_device(cfg.device).type),
        "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
        "seconds": round(result.seconds, 1), "history": result.history,
    }


def load_wrn(work: Path, phase: str, num_classes: int, in_channels: int = 3) -> WideResNet:
    info = phase_info(work, phase)
    model = WideResNet(WRNSpec(**info["architecture"]), num_classes, in_channels)
    model.load_state_dict(load_file(str(work / f"{phase}.safetensors")))
    return model.eval()


def load_experts(work: Path, splits: Splits) -> dict[str, ExpertHead]:
    info = phase_info(work, "experts")
    spec = WRNSpec(**info["architecture"])
    state = load_file(str(work / "experts.safetensors"))
    library_channels = info["library_channels"]
    experts = {}
    for t in info["tasks"]:
        head = expert_head(spec, library_channels, len(splits.taxonomy.tasks[t]), seed=0)
        head.load_state_dict({k[len(t) + 1:]: v for k, v in state.items() if k.startswith(t + ".")})
        experts[t] = head.eval()
    return experts


def run_phase(
    phase: str, work: Path, splits: Splits, plan: ExtractionPlan,
    progress: ProgressFn | None = None,
) -> dict:
    """Run one phase unless its result is already in `work`; return its figures."""
    work.mkdir(parents=True, exist_ok=True)
    if phase_done(work, phase):
        log.info("%s: already done in %s", phase, work)
        return phase_info(work, phase)
    n_classes = len(splits.taxonomy.classes)
    in_ch = splits.image_shape[0]
    ckpt = work / f"{phase}.checkpoint"
    if phase == "oracle":
        model, result = train_oracle(splits, plan.oracle_spec, plan.oracle_cfg, with_val=plan.oracle_with_val,
                                     checkpoint=ckpt, progress=progress)
        info = _figures(result, plan.oracle_cfg, plan.oracle_spec)
        info |= {"trained_on": "train+val" if plan.oracle_with_val else "train",
                 "normalization": {"mean": list(splits.mean), "std": list(splits.std)}}
        info |= _size(model, splits)
        state = model.state_dict()
    elif phase == "library":
        oracle = load_wrn(work, "oracle", n_classes, in_ch)
        model, result = train_library(oracle, splits, plan.library_spec, plan.library_cfg,
                                      checkpoint=ckpt, progress=progress)
        info = _figures(result, plan.library_cfg, plan.library_spec)
        info |= _size(model, splits)
        info["library_params"] = count_params(model.library)
        state = model.state_dict()
    elif phase == "experts":
        oracle = load_wrn(work, "oracle", n_classes, in_ch)
        library = load_wrn(work, "library", n_classes, in_ch).library
        tasks = list(plan.tasks) if plan.tasks else splits.taxonomy.task_names
        splits.taxonomy.validate(tasks)
        experts, result = train_experts(library, oracle, splits, tasks, plan.expert_spec,
                                        plan.expert_cfg, checkpoint=ckpt, progress=progress)
        info = _figures(result, plan.expert_cfg, plan.expert_spec)
        info |= {"tasks": tasks, "library_channels": library.out_channels}
        state = {f"{t}.{k}": v for t, head in experts.items() for k, v in head.state_dict().items()}
    else:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    info["machine"] = machine_summary(pick_device(plan.oracle_cfg.device))
    _save_phase(work, phase, state, info)
    remove_checkpoint(ckpt)
    return info


def _size(model: WideResNet, splits: Splits) -> dict:
    return {"params": count_params(model), "flops": count_flops(model.cpu(), splits.image_shape)}

