"""The preprocessing pipeline: oracle -> library -> experts -> pool bundle.

Every phase leaves its result in a work directory (`<phase>.safetensors` plus
`<phase>.json` with its figures) and a checkpoint while it runs, so an interrupted
extraction resumes where it stopped and a finished phase is never trained twice.

The oracle is trained here or brought by the operator (`ExternalOracle`: a kept poe
oracle or any ONNX classifier); either way the work directory holds it afterwards, so
a pool can be rebuilt or extended from it. With a view recipe (`ExtractionPlan.bank`)
the library and expert phases read the oracle's targets from a logit bank instead of
running the oracle on every batch (see poe_core.bank).

Training modules are imported inside the functions that train: reading a finished
work directory (`phase_done`, `phase_info`, `load_wrn`) does not import the training stack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poe_core import distributed
from poe_core.checkpoint import remove_checkpoint
from poe_core.data import Splits
from poe_core.device import machine_summary, pick_device, resolve_precision
from poe_core.files import atomic_write, sha256_file
from poe_core.nets import ArchSpec, ExpertHead, Network, count_flops, count_params, expert_head, spec_from_dict
from poe_core.oracle import Oracle, OracleError, load_onnx_oracle, load_poe_oracle, read_class_list
from poe_core.recipe import ExternalOracle, ExtractionPlan, Progress, ProgressFn, TrainConfig

__all__ = ["PHASES", "ExtractionPlan", "ExternalOracle", "load_expert_widths", "load_experts", "load_oracle",
           "load_wrn", "phase_done", "phase_info", "run_phase"]

log = logging.getLogger(__name__)

PHASES = ("oracle", "library", "experts")
ONNX_ORACLE = "oracle.onnx"
# Where a library phase finds the weights it starts from instead of random ones
# (`<LIBRARY_INIT>.safetensors`, with `.json` saying whose they are): see seed_from_pool.
LIBRARY_INIT = "library-init"


def _save_phase(work: Path, phase: str, state: dict[str, torch.Tensor], info: dict) -> None:
    tmp = work / f"{phase}.safetensors.tmp"
    save_file({k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.cpu()
               for k, v in state.items()}, str(tmp))
    os.replace(tmp, work / f"{phase}.safetensors")
    _write_info(work, phase, info)


def _write_info(work: Path, phase: str, info: dict) -> None:
    atomic_write(work / f"{phase}.json", json.dumps(info, indent=2))


class PhaseMissing(OracleError):
    """A phase asked for before the phases it builds on are done in the work directory."""


def phase_done(work: Path, phase: str) -> bool:
    if not (work / f"{phase}.json").is_file():
        return False
    return (work / f"{phase}.safetensors").is_file() or (phase == "oracle" and (work / ONNX_ORACLE).is_file())


def phase_info(work: Path, phase: str) -> dict:
    return json.loads((work / f"{phase}.json").read_text())


def _figures(result, cfg: TrainConfig, spec: ArchSpec) -> dict:
    return {
        "architecture": spec.to_dict(), "config": cfg.to_dict(), "epochs": result.epochs,
        "precision": resolve_precision(cfg.precision, pick_device(cfg.device).type),
        "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
        "seconds": round(result.seconds, 1), "history": result.history,
    }


def load_wrn(work: Path, phase: str, num_classes: int, in_channels: int = 3) -> Network:
    info = phase_info(work, phase)
    model = Network(spec_from_dict(info["architecture"]), num_classes, in_channels)
    model.load_state_dict(load_file(str(work / f"{phase}.safetensors")))
    return model.eval()


def load_oracle(work: Path, splits: Splits, device: torch.device) -> Oracle:
    """The work directory's oracle (trained here or brought), as the students see it."""
    info = phase_info(work, "oracle")
    if info.get("kind") == "onnx":
        norm = info["normalization"]
        return load_onnx_oracle(work / ONNX_ORACLE, splits.taxonomy.classes, info["classes"],
                                norm["mean"], norm["std"], splits.image_shape)
    if "normalization" not in info:  # oracles trained before normalisation was recorded
        info["normalization"] = {"mean": list(splits.mean), "std": list(splits.std)}
        _write_info(work, "oracle", info)
    return load_poe_oracle(work / "oracle.safetensors", splits.taxonomy.classes, device)


def load_expert_widths(work: Path, splits: Splits) -> dict[float, dict[str, ExpertHead]]:
    """Every expert of the work directory: head width ks -> task -> head."""
    info = phase_info(work, "experts")
    spec = spec_from_dict(info["architecture"])
    state = load_file(str(work / "experts.safetensors"))
    channels = info["library_channels"]
    widths = info.get("widths")
    out: dict[float, dict[str, ExpertHead]] = {}
    for ks in widths or [spec.ks]:
        out[ks] = {}
        for t in info["tasks"]:
            prefix = f"{t}@{ks:g}." if widths else f"{t}."
            head = expert_head(spec.with_ks(ks), channels, len(splits.taxonomy.tasks[t]), seed=0)
            head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            out[ks][t] = head.eval()
    return out


def load_experts(work: Path, splits: Splits) -> dict[str, ExpertHead]:
    """The experts at the default width (the experts phase's architecture ks)."""
    info = phase_info(work, "experts")
    return load_expert_widths(work, splits)[info["architecture"]["ks"]]


def bring_oracle(work: Path, splits: Splits, external: ExternalOracle) -> dict:
    """Copy an operator's oracle into the work directory as its oracle phase, after
    checking it is a classifier over the data set's classes."""
    work.mkdir(parents=True, exist_ok=True)
    path = Path(external.path)
    if not path.is_file():
        raise OracleError(f"oracle file {path} does not exist")
    mean = tuple(external.mean or splits.mean)
    std = tuple(external.std or splits.std)
    if external.kind == "onnx":
        classes = read_class_list(Path(external.classes)) if external.classes else list(splits.taxonomy.classes)
        load_onnx_oracle(path, splits.taxonomy.classes, classes, mean, std, splits.image_shape)
        shutil.copyfile(path, work / ONNX_ORACLE)
        info = {"kind": "onnx", "classes": classes, "normalization": {"mean": list(mean), "std": list(std)},
                "source": path.name, "sha256": sha256_file(path), "val_acc": {}, "seconds": 0.0}
    else:
        oracle = load_poe_oracle(path, splits.taxonomy.classes, torch.device("cpu"))
        info = json.loads(path.with_suffix(".json").read_text())
        info |= {"kind": "poe", "source": path.name, "sha256": oracle.fingerprint}
        shutil.copyfile(path, work / "oracle.safetensors")
    _write_info(work, "oracle", info)
    return info


def seed_from_pool(work: Path, pool, splits: Splits, *, continue_library: bool = False) -> list[str]:
    """Give `work` the oracle and library phases of a built `pool` (poe_core.pool.Pool):
    its kept oracle, and its library with the student head, as finished phases, so that
    `run_phase("experts", ...)` retrains the experts (another recipe, more epochs, other
    widths) on exactly the pool's library without the oracle and library phases.
    With `continue_library` the library phase is left to train, starting from the pool's
    library and student head (a warm restart; see LIBRARY_INIT).
    Phases already done in `work` are left alone; returns the phases seeded."""
    from poe_core.recipe import ExternalOracle

    work.mkdir(parents=True, exist_ok=True)
    seeded = []
    entry = pool.spec.oracle
    if not phase_done(work, "oracle"):
        if entry is None:
            raise OracleError(f"pool {pool.pool_id} keeps no oracle to train experts from")
        external = ExternalOracle(pool.path(entry.weights))
        if entry.format == "onnx":
            classes = work / "oracle-classes.json"
            atomic_write(classes, json.dumps(entry.classes))
            external = ExternalOracle(external.path, classes, tuple(entry.normalization.mean),
                                      tuple(entry.normalization.std))
        bring_oracle(work, splits, external)
        seeded.append("oracle")
    if not phase_done(work, "library"):
        info = pool.spec.training.get("library")
        if pool.unavailable("mask") or not info or "architecture" not in info:
            raise OracleError(f"pool {pool.pool_id} keeps no library student head (or no library record) "
                              "to seed a work directory with")
        state = {f"library.{k}": v for k, v in pool.library.state_dict().items()}
        state |= {f"head.{k}": v for k, v in pool.student_head().state_dict().items()}
        if continue_library:
            record = {"pool": pool.pool_id, "epochs": info.get("epochs"), "config": info.get("config"),
                      "val_acc": info.get("val_acc")}
            _save_phase(work, LIBRARY_INIT, state, record)
            seeded.append("library start")
        else:
            _save_phase(work, "library", state, dict(info) | {"seeded_from_pool": pool.pool_id})
            seeded.append("library")
    return seeded


def keep_pool_widths(work: Path, pool) -> list[float]:
    """Give the finished experts phase of `work`, which retrained some of the expert
    widths of `pool` on exactly its library (a work directory seeded by seed_from_pool),
    the pool's own experts at the other widths, so the pool built from it keeps them
    (a longer recipe spent on one width leaves the others as they were). The phase's
    record says which widths were kept, from which pool and its experts' recipe.
    Returns the widths added (none if there are none or they were added already)."""
    info = phase_info(work, "experts")
    library = phase_info(work, "library") if phase_done(work, "library") else {}
    if library.get("seeded_from_pool") != pool.pool_id:
        raise OracleError(f"{work}: its library is not that of pool {pool.pool_id} (not seeded from it), so the "
                          "pool's experts do not fit it")
    ours = spec_from_dict(info["architecture"])
    theirs = spec_from_dict(pool.spec.architecture.expert)
    if ours.with_ks(theirs.ks) != theirs:
        raise OracleError(f"pool {pool.pool_id}: its experts are {theirs}, the work directory's {ours}")
    missing = [t for t in info["tasks"] if t not in pool.tasks]
    if missing:
        raise OracleError(f"pool {pool.pool_id} has no experts for {', '.join(missing)}")
    trained = [float(w) for w in info.get("widths") or [ours.ks]]
    kept = [w for w in pool.widths if w not in trained]
    if not kept or "kept_from_pool" in info:
        return []
    state = load_file(str(work / "experts.safetensors"))
    for ks in kept:
        for t in info["tasks"]:
            state |= {f"{t}@{ks:g}.{k}": v for k, v in pool.expert(t, ks).state_dict().items()}
    info = dict(info) | {"widths": sorted(trained + kept), "kept_from_pool": {
        "pool": pool.pool_id, "widths": kept, "config": pool.spec.training.get("experts", {}).get("config")}}
    _save_phase(work, "experts", state, info)
    return kept


def run_phase(
    phase: str, work: Path, splits: Splits, plan: ExtractionPlan,
    progress: ProgressFn | None = None,
) -> dict:
    """Run one phase unless its result is already in `work`; return its figures.
    Under torchrun every rank trains and rank 0 alone writes the result; the ranks
    leave together, so the next phase finds it (see poe_core.distributed)."""
    from poe_core import train

    work.mkdir(parents=True, exist_ok=True)
    if phase_done(work, phase):
        log.info("%s: already done in %s", phase, work)
        return phase_info(work, phase)
    for before in PHASES[:PHASES.index(phase)] if phase in PHASES else ():
        if not phase_done(work, before):
            raise PhaseMissing(f"the {phase} phase needs a finished {before} phase in {work}: run it too (--phase "
                               f"{before}; with --oracle FILE that phase brings the oracle in), or take the phases "
                               f"from a pool (--from-pool)")
    n_classes = len(splits.taxonomy.classes)
    in_ch = splits.image_shape[0]
    ckpt = work / f"{phase}.checkpoint"
    if phase == "oracle":
        if plan.oracle is not None:
            with distributed.main_first():
                if not phase_done(work, phase):
                    bring_oracle(work, splits, plan.oracle)
            return phase_info(work, phase)
        model, result = train.train_oracle(splits, plan.oracle_spec, plan.oracle_cfg,
                                           with_val=plan.oracle_with_val, checkpoint=ckpt, progress=progress)
        info = _figures(result, plan.oracle_cfg, plan.oracle_spec)
        info |= {"kind": "poe", "trained_on": "train+val" if plan.oracle_with_val else "train",
                 "normalization": {"mean": list(splits.mean), "std": list(splits.std)}}
        info |= _size(model, splits)
        state = model.state_dict()
    elif phase == "library":
        teacher, bank_info = _teacher(work, splits, plan, plan.library_cfg, progress)
        continued = phase_done(work, LIBRARY_INIT)
        init = load_file(str(work / f"{LIBRARY_INIT}.safetensors")) if continued else None
        model, result = train.train_library(teacher, splits, plan.library_spec, plan.library_cfg,
                                            checkpoint=ckpt, progress=progress, init=init)
        info = _figures(result, plan.library_cfg, plan.library_spec) | bank_info
        if continued:  # the recorded config's `init` is the experts' field: say where this one started
            info["continued_from"] = phase_info(work, LIBRARY_INIT)
            info["config"] = info["config"] | {"init": "continued"}
        info |= _size(model, splits)
        info["library_params"] = count_params(model.library)
        state = model.state_dict()
    elif phase == "experts":
        student = load_wrn(work, "library", n_classes, in_ch)
        library = student.library
        tasks = list(plan.tasks) if plan.tasks else splits.taxonomy.task_names
        splits.taxonomy.validate(tasks)
        teacher, bank_info = _teacher(work, splits, plan, plan.expert_cfg, progress, library=library)
        experts, result = train.train_experts(library, teacher, splits, tasks, plan.expert_spec, plan.expert_cfg,
                                              widths=plan.widths, checkpoint=ckpt, progress=progress,
                                              student=student.head)
        info = _figures(result, plan.expert_cfg, plan.expert_spec) | bank_info
        info |= {"tasks": tasks, "widths": plan.widths, "library_channels": library.out_channels}
        state = {f"{name}.{k}": v for name, head in experts.items() for k, v in head.state_dict().items()}
    else:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    info["machine"] = machine_summary(pick_device(plan.oracle_cfg.device))
    if distributed.world_size() > 1:
        info["processes"] = distributed.world_size()
    if distributed.is_main():
        _save_phase(work, phase, state, info)
        remove_checkpoint(ckpt)
    distributed.barrier()
    return info


def _teacher(work: Path, splits: Splits, plan: ExtractionPlan, cfg: TrainConfig, progress: ProgressFn | None,
             library: torch.nn.Module | None = None):
    """What a student phase learns from: the logit bank of the work directory's oracle
    (built or resumed here), or the oracle module itself when the plan has no bank.
    Given the frozen `library` (the expert phase) and more epochs than views, the bank
    also holds its features of every stored view, so the experts train without running
    the library either."""
    from poe_core.bank import build_bank, build_features
    from poe_core.data import Normalize

    device = pick_device(cfg.device)
    oracle = load_oracle(work, splits, device)
    if plan.bank is None:
        if oracle.module is None:
            raise OracleError("an ONNX oracle is run through a logit bank: give the plan a view recipe")
        if (oracle.mean, oracle.std) != (tuple(splits.mean), tuple(splits.std)):
            # Run live, the oracle would see images normalised for the students.
            raise OracleError("the oracle was trained with another normalisation than this data set's: "
                              "read it through a logit bank (bank views >= 1)")
        return oracle.module, {"teacher": "live oracle"}

    def report(what: str):
        def done_of(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress(what, 1, 1, done, total, 0.0))
        return done_of

    precision = resolve_precision(cfg.precision, device.type)
    with distributed.main_first():  # rank 0 fills the bank; the others find it complete and read it
        bank = build_bank(oracle, splits.train, plan.bank.at_size(splits.image_shape[1]), work, device=device,
                          precision=precision, progress=report("bank"))
        if library is not None and cfg.epochs > plan.bank.views:  # else the features would cost more than they save
            bank = build_features(library.to(device), bank, splits.train, work, device=device, precision=precision,
                                  normalize=Normalize(splits.mean, splits.std, device), progress=report("features"))
    info = {"teacher": "logit bank", "bank": {"key": bank.key, **asdict(bank.recipe)}}
    if library is not None:
        info["bank"]["library_features"] = bank.features is not None
    return bank, info


def _size(model: Network, splits: Splits) -> dict:
    return {"params": count_params(model), "flops": count_flops(model.cpu(), splits.image_shape)}
