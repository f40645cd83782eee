"""Where an expert should start: random weights (the paper's) or the library's student
head cut to the expert's width and task (poe_core.prune), at which learning rate,
weight alpha of L_scale and KD temperature. Each arm trains the same heads by the
paper's CKD for the same one-cycle epochs from the same logit bank and library
features, and is scored on validation: task-specific top-1 per width, and the PoE
accuracy of every composite of its tasks at n(Q) = 2..5 (L_scale is what makes experts
comparable in a composite).

    python benchmarks/expert_init.py --work var/cifar-work [--views 4] [--epochs 2]
                                     [--widths 0.25,0.5] [--tasks all|paper]
                                     [--arms random,student,student:0.01,student:0.1:0.1,student:0.1:0.3:2]
                                     [--out var/reproduction/expert_init.json]

Needs a work directory with a finished oracle and library (the library phase's student
head is what `student` cuts from). The arms are equal in epochs, so in wall time: the
cut itself costs under a second. Also prints each arm's starting point (epoch 0 =
before any training), which for `student` at ks = 1 would be the mask baseline.
Selection only: nothing here reads the test split. Prints the machine first. The rows
of arms run before (in --out) are kept unless an arm of the same start, lr, alpha, width
and epochs replaces them, so benchmarks/reproduction.py shows every arm ever compared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from reproduction import TASKS as PAPER_TASKS  # the six tasks of the paper's CIFAR-100 experiments

from poe_core.bank import ViewRecipe, build_bank, build_features
from poe_core.data import Normalize, load_cifar100_npy
from poe_core.device import cpu_model, machine_line, pick_device, resolve_precision
from poe_core.evaluate import composite_accuracy, predict, task_specific_accuracy
from poe_core.extract import load_oracle, load_wrn, phase_done
from poe_core.nets import WRNSpec
from poe_core.recipe import ExtractionPlan


def main() -> None:
    from poe_core.train import HeadTarget, _initial_heads, expert_name, train_experts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="extraction work dir with oracle and library")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    parser.add_argument("--views", type=int, default=4, help="views of the logit bank the arms read")
    parser.add_argument("--epochs", type=int, default=2, help="one-cycle epochs of every arm")
    parser.add_argument("--widths", default="0.25,0.5", help="head widths ks, comma-separated")
    parser.add_argument("--tasks", default="paper", help="paper (the paper's six), all, or names comma-separated")
    parser.add_argument("--arms", default="random,student",
                        help="INIT[:LR[:ALPHA[:T]]] arms, comma-separated: init random or student; lr, the "
                             "weight alpha of L_scale and the KD temperature T default the recipe's")
    parser.add_argument("--out", type=Path, default=Path("var/reproduction/expert_init.json"),
                        help="where to keep the table for benchmarks/reproduction.py")
    args = parser.parse_args()
    for phase in ("oracle", "library"):
        if not phase_done(args.work, phase):
            parser.error(f"{args.work} has no finished {phase}")
    widths = [float(w) for w in args.widths.split(",")]
    try:
        arms = [_arm(a) for a in args.arms.split(",")]
    except ValueError:
        parser.error(f"--arms {args.arms!r} is not INIT[:LR[:ALPHA[:T]]],...")
    if {arm[0] for arm in arms} - {"random", "student"}:
        parser.error("inits are random and student")

    device = pick_device()
    print(machine_line(device), flush=True)
    precision = resolve_precision("auto", device.type)
    splits = load_cifar100_npy(args.data)
    tasks = {"paper": PAPER_TASKS, "all": splits.taxonomy.task_names}.get(args.tasks, args.tasks.split(","))
    splits.taxonomy.validate(tasks)
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if earlier and earlier.get("tasks") != tasks:
        parser.error(f"{args.out} compares other tasks ({earlier.get('tasks')}): give another --out")
    student = load_wrn(args.work, "library", len(splits.taxonomy.classes))
    oracle = load_oracle(args.work, splits, device)
    bank = build_bank(oracle, splits.train, ViewRecipe(args.views), args.work, device=device, precision=precision)
    bank = build_features(student.library.to(device), bank, splits.train, args.work, device=device,
                          precision=precision, normalize=Normalize(splits.mean, splits.std, device))
    base = replace(ExtractionPlan().expert_cfg, epochs=args.epochs)
    spec = WRNSpec(16, 1, 0.25)
    val_features = predict(student.library, splits.val, splits.mean, splits.std, device, precision=precision)

    rows = []
    for init, lr, alpha, temperature in arms:
        cfg = replace(base, init=init, lr=lr or base.lr, alpha=base.alpha if alpha is None else alpha,
                      temperature=temperature or base.temperature)
        arm = f"{init} lr {cfg.lr:g} alpha {cfg.alpha:g} T {cfg.temperature:g}"
        names = splits.taxonomy.task_names
        heads = {expert_name(t, ks): HeadTarget(splits.taxonomy.tasks[t], "ckd", names.index(t) + 1_000_003 * w, ks)
                 for w, ks in enumerate(widths) for t in tasks}
        start = _initial_heads(student.library, splits, heads, spec, cfg, student.head)
        with torch.no_grad():
            at_start = {n: task_specific_accuracy(h.eval()(val_features).float(), splits.val.y, heads[n].classes)
                        for n, h in start.items()}
        trained, result = train_experts(student.library, bank, splits, tasks, spec, cfg, widths=widths,
                                        student=student.head)
        for ks in widths:
            names_ks = [expert_name(t, ks) for t in tasks]
            before = sum(at_start[n] for n in names_ks) / len(names_ks)
            after = sum(result.best_val_acc[n] for n in names_ks) / len(names_ks)
            with torch.no_grad():  # every expert at its best epoch, as a pool holds it
                logits = {t: trained[expert_name(t, ks)].eval()(val_features).float() for t in tasks}
            poe = {n: statistics.mean(composite_accuracy(logits, splits.val.y, splits.taxonomy, c)
                                      for c in itertools.combinations(tasks, n))
                   for n in range(2, min(5, len(tasks)) + 1)}
            rows.append({"init": init, "lr": cfg.lr, "alpha": cfg.alpha, "temperature": cfg.temperature, "ks": ks,
                         "epochs": args.epochs,
                         "views": args.views, "machine": cpu_model(), "precision": precision,
                         "start": before, "val_acc": after, "poe": poe,
                         "seconds": result.seconds,
                         "per_task": {t: result.best_val_acc[expert_name(t, ks)] for t in tasks}})
            print(f"{arm} ks={ks:g}: mean task-specific validation {before:.2%} at the start, {after:.2%} after "
                  f"{args.epochs} epochs, PoE n(Q) = 2..: {' / '.join(f'{v:.2%}' for v in poe.values())} "
                  f"({result.seconds:.0f} s for all widths)", flush=True)

    print("\n| init | lr | alpha | T | ks | epochs | at the start | after | PoE n(Q) = 2.. | seconds (all widths) |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['init']} | {r['lr']:g} | {r['alpha']:g} | {r['temperature']:g} | {r['ks']:g} | {r['epochs']} "
              f"| {r['start']:.2%} "
              f"| {r['val_acc']:.2%} | {' / '.join(f'{v:.2%}' for v in r['poe'].values())} | {r['seconds']:.0f} |")
    arm_of = lambda r: (r["init"], r["lr"], r["alpha"], r["temperature"], r["ks"], r["epochs"])  # noqa: E731
    rerun = {arm_of(r) for r in rows}
    kept = [r for r in (_complete(r, earlier) for r in earlier.get("rows", [])) if arm_of(r) not in rerun]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    restored = {"restored_from": earlier["restored_from"]} if kept and earlier.get("restored_from") else {}
    args.out.write_text(json.dumps({"tasks": tasks, "rows": kept + rows} | restored, indent=1))


def _arm(text: str) -> tuple[str, float | None, float | None, float | None]:
    """INIT[:LR[:ALPHA[:T]]]: the start, and the lr, alpha and temperature (None: the recipe's)."""
    if text.count(":") > 3:
        raise ValueError(text)
    init, lr, alpha, temperature = (text.split(":") + ["", "", ""])[:4]
    return init, float(lr) if lr else None, float(alpha) if alpha else None, float(temperature) if temperature else None


def _complete(row: dict, table: dict) -> dict:
    """A row of a table written before rows carried their own recipe: those arms ran the
    recipe's alpha and temperature of the time, 0.3 and 4, and the table's epochs and views."""
    return {"alpha": 0.3, "temperature": 4.0, "epochs": table.get("epochs"), "views": table.get("views"),
            "machine": table.get("machine"), "precision": table.get("precision"), "poe": {}} | row


if __name__ == "__main__":
    main()
