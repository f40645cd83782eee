"""Reproduce the paper's CIFAR-100 tables at this machine's scale: docs/REPRODUCTION.md.

    python benchmarks/reproduction.py --work var/cifar-work --pool poe_core/pools/cifar100

Needs the `bench` extra (matplotlib, for the confidence histogram): pip install -e '.[bench]'.

Needs a finished extraction work directory (oracle, library, experts) and the pool built
from it. Trains the baselines (Transfer, Scratch) and the loss ablation itself; every
trained result is cached in --cache so an interrupted run resumes. With --reuse (the
reproduction.json of an earlier run on the same oracle and library, e.g. after retraining
only the experts) those are taken from that run instead: they do not depend on the
experts, and the ablation's logit bank need not be built again. All selection is on the
validation split; every figure printed is on the test split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from poe_core.assemble import Assembler
from poe_core.bank import LogitBank, ViewRecipe, build_bank, build_features, module_fingerprint
from poe_core.data import Normalize, load_cifar100_npy
from poe_core.device import machine_summary, resolve_precision
from poe_core.evaluate import cross_expert_error_share, predict, task_specific_accuracy
from poe_core.extract import load_oracle, load_wrn, phase_info
from poe_core.nets import BranchedModel, WRNSpec, count_flops, count_params
from poe_core.pool import load_pool, onnx_logits
from poe_core.reject import auroc
from poe_core.reject import score as reject_score
from poe_core.train import HeadTarget, TrainConfig, train_heads, train_scratch, train_transfer

TASKS = ["large_omnivores_and_herbivores", "medium_mammals", "people", "small_mammals",
         "vehicles_1", "vehicles_2"]
PAPER = {
    "oracle": 76.70, "library": 63.84,
    "table2": {"CKD": 82.40, "Transfer": 78.33, "Scratch": 74.20, "Oracle": 85.80},
    "poe": {2: 79.03, 3: 76.41, 4: 74.18, 5: 72.22},
    "oracle_ts": {2: 84.25, 3: 82.94, 4: 81.82, 5: 80.82},
}
CPU = torch.device("cpu")


def teacher_of(work: Path, splits, library):
    """What the pool's experts learned from: the work directory's logit bank (with the
    library's stored features when the expert phase left them), else the oracle itself."""
    oracle = load_oracle(work, splits, CPU)
    recipe = phase_info(work, "experts").get("bank")
    if not recipe:
        return oracle.module
    bank = build_bank(oracle, splits.train, ViewRecipe(recipe["views"], recipe["pad"], recipe["seed"]), work,
                      device=CPU, precision=resolve_precision("auto", "cpu"))
    return build_features(library, bank, splits.train, work, device=CPU, compute=False,
                          normalize=Normalize(splits.mean, splits.std, CPU),
                          precision=resolve_precision("auto", "cpu"))


def cached(cache: Path, name: str, compute):
    path = cache / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    torch.save(value, path)
    return value


def _machine(m: dict | None, reused: bool = False) -> list[str]:
    if m is None:
        return []
    timed = ("the assembly times below were measured on it (the composite model's training time comes with the "
             "reused run, section 5)" if reused else
             "the assembly times and the composite model's training time below were measured on it")
    return ["", f"This run: {m['cpu']}, {m['cores']} cores, {m['precision']}; {timed}, the oracle's and the "
                "library's training times are those of their own phases (their records name the machines)."]


def _library_training(lib: dict) -> str:
    done = f"{lib['epochs']} epochs, {lib['train_seconds'] / 60:.0f} min"
    before = lib.get("continued_from")
    return done if before is None else (f"{done}, continuing the {before['epochs']}-epoch library of pool "
                                        f"{before['pool'][:8]}")


def pm(values) -> str:
    values = [100 * v for v in values]
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def max_prob_out_of_task(logits: torch.Tensor, labels: torch.Tensor, classes) -> np.ndarray:
    out = ~torch.isin(labels, torch.tensor(list(classes)))
    return torch.softmax(logits[out], 1).max(1).values.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    ap.add_argument("--cache", type=Path, default=Path("var/reproduction"))
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--baseline-epochs", type=int, default=30,
                    help="epochs of Transfer and Scratch (cheap: they see only their task's images)")
    ap.add_argument("--ablation-epochs", type=int, default=4,
                    help="epochs of every head of the loss ablation (all variants the same)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="reproduction.json of an earlier run on the same oracle and library: take its "
                         "Transfer and Scratch baselines and its loss ablation instead of training them")
    args = ap.parse_args()
    try:  # the figure is drawn at the end: say so now, not after the baselines have trained
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("reproduction.py draws a figure with matplotlib: pip install -e '.[bench]'") from None
    earlier = json.loads(args.reuse.read_text()) if args.reuse else None
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    splits = load_cifar100_npy(args.data)
    tax = splits.taxonomy
    test = splits.test
    pool = load_pool(args.pool)
    oracle = load_wrn(args.work, "oracle", 100)
    student = load_wrn(args.work, "library", 100)
    library = student.library
    info = {p: phase_info(args.work, p) for p in ("oracle", "library", "experts")}
    expert_spec = WRNSpec(**info["experts"]["architecture"])
    library_spec = WRNSpec(**info["library"]["architecture"])
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    machine = machine_summary(CPU) | {"precision": resolve_precision("auto", "cpu")}
    fig: dict = {"pool_id": pool.pool_id, "machine": machine,
                 "fingerprints": {"oracle": module_fingerprint(oracle), "library": module_fingerprint(library)}}

    # 1. Oracle and library (paper Table 1).
    oracle_logits = cached(args.cache, "oracle_test", lambda: predict(oracle, test, splits.mean, splits.std, CPU))
    student_logits = cached(args.cache, "student_test",
                            lambda: predict(student, test, splits.mean, splits.std, CPU))
    fig["oracle"] = {"arch": str(WRNSpec(**info["oracle"]["architecture"])),
                     "test_acc": (oracle_logits.argmax(1) == test.y).float().mean().item(),
                     "params": count_params(oracle), "flops": count_flops(oracle, (3, 32, 32)),
                     "train_seconds": info["oracle"]["seconds"], "epochs": info["oracle"]["epochs"]}
    fig["library"] = {"arch": str(library_spec),
                      "test_acc": (student_logits.argmax(1) == test.y).float().mean().item(),
                      "params": count_params(student), "library_params": count_params(library),
                      "flops": count_flops(student, (3, 32, 32)),
                      "train_seconds": info["library"]["seconds"], "epochs": info["library"]["epochs"]}
    if "continued_from" in info["library"]:  # a warm restart of an earlier pool's library
        fig["library"]["continued_from"] = {k: info["library"]["continued_from"][k] for k in ("pool", "epochs")}
    say("oracle", fig["oracle"]["test_acc"], "library student", fig["library"]["test_acc"])
    reused = _reusable(earlier, fig) if earlier is not None else None
    if reused is not None:
        fig["reused"] = reused
        say("baselines and ablation taken from", args.reuse, reused)

    # CKD experts of the pool: logits of the very ONNX parts the service assembles.
    def pool_test_logits():
        lib = pool.path(pool.spec.library.onnx).read_bytes()
        parts = {t: pool.path(pool.part(t).onnx).read_bytes() for t in pool.tasks}
        return {t: torch.from_numpy(v) for t, v in onnx_logits(lib, parts, test, pool.mean, pool.std).items()}

    ckd_logits = cached(args.cache, "ckd_test", pool_test_logits)

    # 2. Specialization (Table 2): CKD vs Transfer vs Scratch vs the oracle.
    base_cfg = TrainConfig(epochs=args.baseline_epochs, lr=0.05)
    transfer_logits, scratch_logits, t2 = {}, {}, {"CKD": [], "Transfer": [], "Scratch": [], "Oracle": []}
    for task in TASKS:
        classes = tax.tasks[task]

        def transfer(classes=classes):
            head, _ = train_transfer(library, splits, classes, expert_spec, base_cfg)
            return predict(BranchedModel(library, [head]), test, splits.mean, splits.std, CPU)

        def scratch(classes=classes):
            model, _ = train_scratch(splits, classes, library_spec, expert_spec, base_cfg)
            return predict(model, test, splits.mean, splits.std, CPU)

        t2["CKD"].append(task_specific_accuracy(ckd_logits[task], test.y, classes))
        if reused is not None:
            for k in ("Transfer", "Scratch"):
                t2[k].append(earlier["table2"][k]["per_task"][task])
        else:
            transfer_logits[task] = cached(args.cache, f"transfer_{task}", transfer)
            scratch_logits[task] = cached(args.cache, f"scratch_{task}", scratch)
            t2["Transfer"].append(task_specific_accuracy(transfer_logits[task], test.y, classes))
            t2["Scratch"].append(task_specific_accuracy(scratch_logits[task], test.y, classes))
        t2["Oracle"].append(task_specific_accuracy(oracle_logits, test.y, classes))
        say(task, {k: round(v[-1], 4) for k, v in t2.items()})
    fig["table2"] = {k: {"per_task": dict(zip(TASKS, v, strict=True)), "mean": statistics.mean(v),
                         "std": statistics.pstdev(v)} for k, v in t2.items()}

    # 3. Confidence on out-of-task images (Fig. 5).
    sources = (("CKD", ckd_logits),) if reused is not None else (
        ("CKD", ckd_logits), ("Transfer", transfer_logits), ("Scratch", scratch_logits))
    conf = {name: np.concatenate([max_prob_out_of_task(src[t], test.y, tax.tasks[t]) for t in TASKS])
            for name, src in sources}
    fig["confidence"] = {k: {"mean_max_prob": float(v.mean()), "share_above_0.9": float((v > 0.9).mean())}
                         for k, v in conf.items()}
    fig["histogram"] = {k: (np.histogram(v, HISTOGRAM_BINS)[0] / len(v)).tolist() for k, v in conf.items()}
    if reused is not None:
        for k in ("Transfer", "Scratch"):
            fig["confidence"][k] = earlier["confidence"][k]
            if k in earlier.get("histogram", {}):
                fig["histogram"][k] = earlier["histogram"][k]
    _histogram(fig["histogram"], args.out / "figures" / "confidence.png")

    # 4. Consolidation (Table 3): all combinations of the 6 tasks, n(Q) = 2..5.
    assembler = Assembler(pool)
    t3 = {}
    for n in (2, 3, 4, 5):
        poe_acc, oracle_acc, mask_acc, params, flops, build_ms = [], [], [], [], [], []
        reject = {"auroc": [], "accept_in_task": [], "reject_out_of_task": []}
        for combo in itertools.combinations(TASKS, n):
            classes = tax.composite_classes(combo)
            t0 = time.perf_counter()
            assembler.assemble(combo)
            build_ms.append((time.perf_counter() - t0) * 1000)
            poe_acc.append(task_specific_accuracy(torch.cat([ckd_logits[t] for t in combo], 1), test.y, classes))
            oracle_acc.append(task_specific_accuracy(oracle_logits, test.y, classes))
            # SMART's mask: the library student's own head restricted to the query's classes.
            mask_acc.append(task_specific_accuracy(student_logits, test.y, classes))
            # "None of these": the rule fitted on validation, applied to the test images.
            rule = pool.reject_rule(pool.query(combo))
            scores = reject_score(torch.cat([ckd_logits[t] for t in combo], 1).numpy(), rule.score)
            inside = torch.isin(test.y, torch.tensor(classes)).numpy()
            accepted = scores >= np.float32(rule.threshold)
            reject["auroc"].append(auroc(scores[inside], scores[~inside]))
            reject["accept_in_task"].append(float(accepted[inside].mean()))
            reject["reject_out_of_task"].append(float((~accepted[~inside]).mean()))
            params.append(pool.composite_params(combo))
            flops.append(pool.composite_flops(combo))
        t3[n] = {"combinations": len(poe_acc), "poe_mean": statistics.mean(poe_acc),
                 "poe_std": statistics.pstdev(poe_acc), "oracle_mean": statistics.mean(oracle_acc),
                 "oracle_std": statistics.pstdev(oracle_acc), "mask_mean": statistics.mean(mask_acc),
                 **{f"reject_{k}": statistics.mean(v) for k, v in reject.items()},
                 "params": statistics.mean(params),
                 "flops": statistics.mean(flops), "build_ms_median": statistics.median(build_ms)}
        say("n", n, t3[n])
    fig["table3"] = t3

    # 5. Loss ablation (Table 5), plus one CKD model trained for a composite task of n(Q) = 5,
    # all heads in one pass over the data (same oracle/library forward for all of them).
    composite = TASKS[:5]
    heads = {f"{kind}:{t}": HeadTarget(tax.tasks[t], kind, seed=1000 + i)
             for kind in ("soft", "scale", "ckd") for i, t in enumerate(TASKS)}
    heads["composite"] = HeadTarget(tuple(tax.composite_classes(composite)), "ckd", seed=7)
    abl_cfg = TrainConfig(epochs=args.ablation_epochs, lr=0.05)

    def ablation():
        trained, result = train_heads(library, teacher, splits, heads, expert_spec, abl_cfg)
        features = predict(library, test, splits.mean, splits.std, CPU)  # once for all heads
        with torch.no_grad():
            logits = {n: torch.cat([h.cpu().float().eval()(f) for f in features.split(1000)])
                      for n, h in trained.items()}
        return {"logits": logits, "best_epoch": result.best_epoch, "val": result.best_val_acc,
                "seconds": result.seconds}

    if reused is not None:
        teacher = None
        t5 = {k: v | {"poe": {int(n): a for n, a in v["poe"].items()}} for k, v in earlier["table5"].items()}
        fig["ablation_epochs"] = earlier["ablation_epochs"]
    else:
        teacher = teacher_of(args.work, splits, library)
        abl = cached(args.cache, "ablation", ablation)
        t5 = _ablation_table(abl["logits"], test, tax)
        fig["ablation_epochs"] = args.ablation_epochs
    fig["table5"] = t5
    fig["baseline_epochs"] = earlier["baseline_epochs"] if reused is not None else args.baseline_epochs
    config = info["library"].get("config", {})
    fig["library"]["kd"] = f"{config.get('kd', 'kd')} at T = {config.get('temperature', 4):g}"
    objectives = args.cache / "library_kd.json"  # benchmarks/library_kd.py: how the objective was chosen
    fig["library_kd"] = json.loads(objectives.read_text()) if objectives.is_file() else None
    if fig["library_kd"] is None and reused is not None:  # the same library: how its objective was chosen
        fig["library_kd"] = earlier.get("library_kd")
    inits = args.cache / "expert_init.json"  # benchmarks/expert_init.py: how the experts' start was chosen
    fig["expert_init"] = json.loads(inits.read_text()) if inits.is_file() else None
    if fig["expert_init"] is None and reused is not None:  # how the experts' start was chosen, as it was
        fig["expert_init"] = earlier.get("expert_init")
    fig["experts_config"] = info["experts"].get("config", {})
    fig["experts_kept"] = info["experts"].get("kept_from_pool")  # widths taken as they were from an earlier pool

    # The CKD model for one composite task of n(Q) = 5: its accuracy, and the wall time to
    # reach its best validation accuracy, timed alone (a 40-step run, scaled to epochs).
    def composite_timing():
        cfg = TrainConfig(epochs=1, lr=0.05)
        few = splits.train.subset(torch.arange(128 * 40))
        short = type(splits)(few, splits.val, None, tax, splits.mean, splits.std, splits.name)
        t0 = time.perf_counter()
        first = slice(0, len(few))  # the bank's (and features') rows of those images
        sliced = teacher if not isinstance(teacher, LogitBank) else replace(
            teacher, logits=teacher.logits[:, first], views=teacher.views[:, first],
            features=None if teacher.features is None else teacher.features[:, first])
        train_heads(library, sliced, short, {"c": heads["composite"]}, expert_spec, cfg)
        return {"seconds_40_steps": time.perf_counter() - t0}

    poe_composite = task_specific_accuracy(torch.cat([ckd_logits[t] for t in composite], 1), test.y,
                                           tax.composite_classes(composite))
    if reused is not None:  # the trained composite model is the ablation's: from the earlier run too
        fig["composite_ckd"] = earlier["composite_ckd"] | {"poe_test_acc": poe_composite}
    else:
        timing = cached(args.cache, "composite_timing", composite_timing)
        steps_per_epoch = -(-len(splits.train) // 128)
        best_epoch = abl["best_epoch"]["composite"]
        fig["composite_ckd"] = {
            "tasks": composite,
            "test_acc": task_specific_accuracy(abl["logits"]["composite"], test.y,
                                               tax.composite_classes(composite)),
            "poe_test_acc": poe_composite,
            "best_epoch": best_epoch,
            "train_seconds_to_best": timing["seconds_40_steps"] / 40 * steps_per_epoch * best_epoch,
        }

    # 6. Pool volume (Table 4), fp32 bytes of the weights.
    expert_params = statistics.mean(pool.expert_info(t)["params"] for t in pool.tasks)
    lib_params = pool.manifest["library"]["params"]
    n_tasks = len(pool.tasks)
    fig["table4"] = {
        "oracle_bytes": 4 * fig["oracle"]["params"],
        "library_bytes": 4 * lib_params,
        "expert_bytes": 4 * expert_params,
        "pool_bytes": 4 * (lib_params + n_tasks * expert_params),
        "pool_dir_bytes": sum(p.stat().st_size for p in pool.root.rglob("*") if p.is_file()),
        "all_specialized_bytes": 4 * (2**n_tasks * lib_params + 2 ** (n_tasks - 1) * n_tasks * expert_params),
    }

    (args.out / "reproduction.json").write_text(json.dumps(fig, indent=1, default=float))
    (args.out / "REPRODUCTION.md").write_text(render(fig, pool))
    say(f"wrote {args.out / 'REPRODUCTION.md'}")


def _ablation_table(logits: dict, test, tax) -> dict:
    """Table 5 from the ablation heads' test logits."""
    t5 = {}
    for kind in ("soft", "scale", "ckd"):
        per = {t: logits[f"{kind}:{t}"] for t in TASKS}
        expert_acc = [task_specific_accuracy(per[t], test.y, tax.tasks[t]) for t in TASKS]
        combos = {n: [task_specific_accuracy(torch.cat([per[t] for t in c], 1), test.y,
                                             tax.composite_classes(c)) for c in itertools.combinations(TASKS, n)]
                  for n in (2, 3, 4, 5)}
        cross = [cross_expert_error_share(per, test.y, tax, c) for n in (2, 3, 4, 5)
                 for c in itertools.combinations(TASKS, n)]
        t5[kind] = {"expert_mean": statistics.mean(expert_acc),
                    "poe": {n: statistics.mean(v) for n, v in combos.items()},
                    "cross_expert_share": statistics.mean(cross)}
    return t5


def _reusable(earlier: dict, fig: dict) -> dict:
    """What --reuse takes, once the earlier run is shown to be on the same oracle and
    library: by their weights' fingerprints, or (runs before fingerprints were written) by
    their test accuracies, equal to the last digit."""
    if "fingerprints" in earlier:
        same = earlier["fingerprints"] == fig["fingerprints"]
        how = "the same oracle and library weights (fingerprints)"
    else:
        same = all(earlier[k]["test_acc"] == fig[k]["test_acc"] for k in ("oracle", "library"))
        how = "the same oracle and library (test accuracies equal to the last digit)"
    if not same:
        raise SystemExit("--reuse: that run was on another oracle or library; train the baselines and the "
                         "ablation again (leave out --reuse)")
    return {"pool_id": earlier.get("pool_id"), "checked_by": how,
            "what": ["Transfer", "Scratch", "ablation", "composite CKD model"]}


def _reuse_note(f: dict, what: str) -> list[str]:
    r = f.get("reused")
    if not r:
        return []
    run = f"the run on pool `{r['pool_id']}`" if r.get("pool_id") else "the earlier run of this script"
    return [f"{what} taken from {run} (`--reuse`): they do not depend on the experts, and it had "
            f"{r['checked_by']}.", ""]


HISTOGRAM_BINS = np.linspace(0, 1, 21)


def _histogram(shares: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, values in shares.items():
        ax.stairs(values, HISTOGRAM_BINS, linewidth=2, label=name)
    ax.set_xlabel("maximum softmax probability on out-of-task test images")
    ax.set_ylabel("share of images")
    ax.set_title("Expert confidence outside its task (6 tasks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _objectives(table: dict | None, chosen: str) -> list[str]:
    """How the library's KD objective was chosen (benchmarks/library_kd.py), if it was run."""
    if table is None:
        return [f"The library was distilled with `{chosen}`; no comparison of objectives was run.", ""]
    rows = [f"| {a['kd']} | {a['temperature']:g} | {100 * a['val_acc']:.2f} | {a['seconds'] / 60:.1f} min |"
            for a in table["arms"]]
    return [f"Library objective, chosen on validation by `python benchmarks/library_kd.py`: the same "
            f"{table['epochs']}-epoch one-cycle run from the bank of {table['views']} views per arm "
            f"({table['machine']}, {table['precision']}); the shipped library uses `{chosen}`.{_restored(table)}", "",
            "| objective | T | validation top-1 | time |", "| --- | --- | --- | --- |", *rows, ""]


def _restored(table: dict) -> str:
    return f" Figures {table['restored_from']}." if table.get("restored_from") else ""


def _recipe(config: dict) -> str:
    return (f"`{config.get('init', 'random')}` start, {config.get('epochs', '?')} epochs at lr "
            f"{config.get('lr', '?')}, alpha {config.get('alpha', '?')}, T {config.get('temperature', '?')}")


def _inits(table: dict | None, config: dict, kept: dict | None = None) -> list[str]:
    """Where the experts started (benchmarks/expert_init.py), if that comparison was run."""
    chosen = _recipe(config)
    if kept:
        chosen += (f"; at ks {', '.join(f'{w:g}' for w in kept['widths'])} the experts of pool {kept['pool']} as "
                   f"they were ({_recipe(kept.get('config') or {})})")
    if table is None:
        return [f"The experts were trained from a {chosen}; no comparison of starts was run.", ""]
    from expert_init import _complete  # rows written before they carried their own recipe

    rows = [_complete(r, table) for r in table["rows"]]
    machines = ", ".join(sorted({f"{r['machine']}, {r['precision']}" for r in rows}))
    lines = [f"| {r['init']} | {r['lr']:g} | {r['alpha']:g} | {r['temperature']:g} | {r['ks']:g} | {r['epochs']} "
             f"| {100 * r['start']:.2f} "
             f"| {100 * r['val_acc']:.2f} | {' / '.join(f'{100 * v:.2f}' for v in r['poe'].values()) or '-'} |"
             for r in rows]
    return [f"Expert start, learning rate, weight alpha of L_scale and KD temperature T, chosen on validation by "
            f"`python benchmarks/expert_init.py`: random weights (the paper's) or the library student's head cut to "
            f"the expert's width and task, each arm a one-cycle CKD run of the epochs shown from the bank of "
            f"{'/'.join(sorted({str(r['views']) for r in rows}))} views, on the {len(table['tasks'])} tasks below "
            f"({machines}); mean task-specific validation accuracy before training and at the best epoch, and "
            f"the PoE accuracy of every composite of those tasks at n(Q) = 2..5 (where measured). The shipped "
            f"experts: {chosen}.{_restored(table)}", "",
            "| start | lr | alpha | T | ks | epochs | before training | after | PoE n(Q) = 2 / 3 / 4 / 5 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *lines, ""]


def render(f: dict, pool) -> str:
    o, lib, t2, t3, t4, t5 = f["oracle"], f["library"], f["table2"], f["table3"], f["table4"], f["table5"]
    c = f["composite_ckd"]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    lines = [
        "# Reproduction of Pool of Experts on CIFAR-100 at this machine's scale",
        "",
        "Written by `python benchmarks/reproduction.py` from the shipped pool "
        f"(`{pool.pool_id}`) and the extraction work directory it was built from. "
        "Every figure is on the CIFAR-100 **test** split (10,000 images); every model and "
        "epoch selection used the validation split (50 images per class held out of train). "
        "Paper figures (Kim & Choi, SIGMOD 2021, CIFAR-100) beside ours.",
        *_machine(f.get("machine"), "reused" in f),
        "",
        "## 1. Oracle and library (paper Table 1)",
        "",
        "| model | architecture | test top-1 | params | FLOPs | training |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| oracle (ours) | {o['arch']} | {pct(o['test_acc'])} | {o['params'] / 1e6:.2f}M | "
        f"{o['flops'] / 1e9:.2f}G | {o['epochs']} epochs, {o['train_seconds'] / 60:.0f} min |",
        "| oracle (paper) | WRN-40-(4,4) | 76.70 | 8.97M | 1.30G | |",
        f"| library student (ours) | {lib['arch']} | {pct(lib['test_acc'])} "
        f"({lib['test_acc'] / o['test_acc']:.2f} x oracle) | {lib['params'] / 1e6:.2f}M "
        f"(library part {lib['library_params'] / 1e6:.3f}M) | {lib['flops'] / 1e9:.3f}G | "
        f"{_library_training(lib)} |",
        "| library student (paper) | WRN-16-(1,1) | 63.84 (0.83 x oracle) | 0.18M | | |",
        "",
        *_objectives(f["library_kd"], lib["kd"]),
        "## 2. Specialization (paper Table 2)",
        "",
        "Task-specific test accuracy (argmax within the task's 5 classes, on the task's "
        "images) for the 6 primitive tasks the paper reports, mean ± std over the 6.",
        "CKD = the pool's experts (library + head by conditional KD on all images); Transfer = "
        "the same head on the frozen library, cross-entropy on the task's own images; Scratch = "
        "library + head architecture from scratch on the task's images. Both baselines see only "
        f"their task's 2,250 training images, so they were given {f['baseline_epochs']} epochs "
        "(cheap on so few images). Oracle = the oracle's logits restricted to the task's classes.",
        "",
        "| task | CKD | Transfer | Scratch | Oracle |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        lines.append(f"| {task} | " + " | ".join(pct(t2[k]["per_task"][task])
                                               for k in ("CKD", "Transfer", "Scratch", "Oracle")) + " |")
    lines += [
        "| **mean ± std (ours)** | " + " | ".join(
            f"{100 * t2[k]['mean']:.2f} ± {100 * t2[k]['std']:.2f}" for k in ("CKD", "Transfer", "Scratch", "Oracle"))
        + " |",
        "| mean (paper) | 82.40 | 78.33 | 74.20 | 85.80 |",
        "",
        *_reuse_note(f, "Transfer and Scratch"),
        *_inits(f["expert_init"], f["experts_config"], f.get("experts_kept")),
        "## 3. Confidence outside the task (paper Fig. 5)",
        "",
        "![confidence](figures/confidence.png)",
        "",
        *([] if set(f.get("histogram", {})) >= set(f["confidence"]) else
          [f"The figure shows {', '.join(f.get('histogram', {}))} only: the earlier run kept no histogram of "
           f"{' and '.join(sorted(set(f['confidence']) - set(f.get('histogram', {}))))}.", ""]),
        "| expert | mean max softmax prob. on out-of-task images | share above 0.9 |",
        "| --- | --- | --- |",
    ]
    for k, v in f["confidence"].items():
        lines.append(f"| {k} | {v['mean_max_prob']:.3f} | {100 * v['share_above_0.9']:.1f}% |")
    lines += [
        "",
        "## 4. Consolidation (paper Table 3)",
        "",
        "All combinations of the 6 tasks; accuracy on the test images of the composite task's "
        "classes, argmax over its classes. Gap = oracle task-specific minus PoE.",
        "",
        "| n(Q) | combos | PoE (ours) | oracle task-specific (ours) | gap (ours) | PoE (paper) | "
        "oracle (paper) | gap (paper) | params | FLOPs | build time (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in t3.items():
        lines.append(
            f"| {n} | {r['combinations']} | {100 * r['poe_mean']:.2f} ± {100 * r['poe_std']:.2f} | "
            f"{100 * r['oracle_mean']:.2f} ± {100 * r['oracle_std']:.2f} | "
            f"{100 * (r['oracle_mean'] - r['poe_mean']):.1f} | {PAPER['poe'][n]} | {PAPER['oracle_ts'][n]} | "
            f"{PAPER['oracle_ts'][n] - PAPER['poe'][n]:.1f} | {r['params'] / 1e6:.3f}M | "
            f"{r['flops'] / 1e9:.3f}G | {r['build_ms_median']:.3f} ms |")
    lines += [
        "",
        "PoE against SMART's mask baseline (the library student's own head over all 100 "
        "classes, restricted to the query's: what `\"method\": \"mask\"` delivers), and the "
        "\"none of these\" rule every answer carries (score and threshold fitted on validation "
        "to accept 95% of in-task images; here applied to the test images; AUROC of its score, "
        "in-task images against all others). With the authors' published weights PoE beats "
        "the mask by 1.6-2.6 points at n(Q) = 2..5; OpenOOD's CIFAR-100 max-softmax baseline "
        "for a full ResNet-18 is about 0.80 AUROC (a reference, not a target).",
        "",
        "| n(Q) | PoE | mask | PoE - mask | reject AUROC | in-task accepted | out-of-task rejected |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in t3.items():
        lines.append(
            f"| {n} | {pct(r['poe_mean'])} | {pct(r['mask_mean'])} | {100 * (r['poe_mean'] - r['mask_mean']):+.1f} | "
            f"{r['reject_auroc']:.3f} | {pct(r['reject_accept_in_task'])}% | {pct(r['reject_reject_out_of_task'])}% |")
    lines += [
        "",
        f"Training instead of assembling: one CKD model for the composite task "
        f"{' + '.join(c['tasks'])} (n(Q) = 5, one head over its 25 classes, same budget as the "
        f"ablation) reached its best validation accuracy at epoch {c['best_epoch']}, which takes "
        f"about {c['train_seconds_to_best'] / 60:.1f} min of training on this machine (timed on a "
        f"40-step run, scaled to the epochs); test accuracy {pct(c['test_acc'])} vs. "
        f"{pct(c['poe_test_acc'])} for the PoE model assembled in "
        f"{t3[5]['build_ms_median']:.3f} ms.",
        "",
        f"## 5. Loss ablation (paper Table 5), {f['ablation_epochs']} epochs for every variant",
        "",
        *_reuse_note(f, "The ablation and the composite-task CKD model of section 4"),
        "| loss | expert task-specific (mean of 6) | PoE n=2 | n=3 | n=4 | n=5 | "
        "cross-expert share of PoE errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"soft": "L_soft only", "scale": "L_scale only", "ckd": "L_soft + 0.3 L_scale (CKD)"}
    for k, r in t5.items():
        poe = [r["poe"][n] for n in (2, 3, 4, 5)]
        lines.append(f"| {names[k]} | {pct(r['expert_mean'])} | " + " | ".join(pct(v) for v in poe)
                     + f" | {100 * r['cross_expert_share']:.1f}% |")
    lines += [
        "",
        "## 6. Pool volume (paper Table 4), fp32 weights",
        "",
        "| what | bytes |",
        "| --- | --- |",
        f"| oracle | {mb(t4['oracle_bytes'])} |",
        f"| library | {mb(t4['library_bytes'])} |",
        f"| one expert | {t4['expert_bytes'] / 1e3:.1f} kB |",
        f"| library + {len(pool.tasks)} experts | {mb(t4['pool_bytes'])} |",
        f"| shipped pool directory (weights, ONNX parts, validation logits, manifest) | "
        f"{mb(t4['pool_dir_bytes'])} |",
        f"| all 2^{len(pool.tasks)} specialized models, each stored whole | "
        f"{t4['all_specialized_bytes'] / 1e12:.2f} TB |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
