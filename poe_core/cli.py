"""The `poe` command line: extract a pool, query a composite model, evaluate one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from poe_core.data import SOURCES, input_options, load_splits
from poe_core.nets import ArchSpec
from poe_core.recipe import COLD_OTHERS_PER_CLASS, COLD_VIEWS, Architecture, ExtractionPlan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pool of Experts: distil an oracle into a pool, assemble models from it.")
# soft_wrap: a message is one line whatever the width of the terminal or pipe it goes to.
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def root() -> None:
    """Pool of Experts: distil an oracle into a pool, assemble models from it."""


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def parse_spec(text: str) -> ArchSpec:
    try:
        return Architecture.parse(text).spec()
    except ValueError:
        fail(f"architecture {text!r} is not DEPTH,KC,KS[,STRIDE] (a WRN, e.g. 16,4,4 or 16,4,4,2) "
             "or mobilenet_v2,SPLIT,KC,KS (e.g. mobilenet_v2,3,1,0.25)")


class ProgressBars:
    """A rich progress bar per training phase, fed by poe_core's progress callback."""

    def __init__(self) -> None:
        self.bars = Progress(TextColumn("{task.description:<8}"), BarColumn(),
                             TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}"
                                        "  val {task.fields[val]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def __call__(self, p) -> None:
        if p.phase not in self.tasks:
            self.tasks[p.phase] = self.bars.add_task(p.phase, total=1.0, epoch="-", loss=0.0, val="-")
        fields = {"epoch": f"{p.epoch}/{p.epochs}", "loss": p.loss}
        if p.val_acc is not None:
            fields["val"] = f"{p.val_acc:.2%}"
        self.bars.update(self.tasks[p.phase], completed=p.fraction, **fields)
        if p.val_acc is not None and not console.is_terminal:
            logging.getLogger("poe").info("%s epoch %d/%d: loss %.4f, validation %.2f%%",
                                          p.phase, p.epoch, p.epochs, p.loss, 100 * p.val_acc)


DEFAULT = ExtractionPlan()


def _arch(spec) -> str:
    return Architecture.of(spec).text()


@app.command()
def extract(
    work: Annotated[Path, typer.Option(help="Work directory: checkpoints, finished phases, the logit bank.")],
    out: Annotated[Path | None, typer.Option(help="Pool directory to write when all phases are done.")] = None,
    data: Annotated[str, typer.Option(help=f"Data source: {', '.join(SOURCES)}.")] = "cifar100-npy",
    data_path: Annotated[Path | None, typer.Option(help="Data directory (or torchvision root).")] = None,
    hierarchy: Annotated[Path | None, typer.Option(help="Task -> classes JSON for image-folder (class names, or WordNet ids with words.txt and wordnet.is_a.txt beside train/).")] = None,
    image_size: Annotated[int, typer.Option(help="image-folder: the model input's side in pixels (photos are center-cropped to it).")] = 32,
    resize: Annotated[int | None, typer.Option(help="image-folder: resize each photo's shorter side to this before cropping (default: --image-size).")] = None,
    download: Annotated[bool, typer.Option(help="Let torchvision download CIFAR-100.")] = False,
    val_per_class: Annotated[int, typer.Option(help="Validation images held out per class.")] = 50,
    phase: Annotated[list[str] | None, typer.Option(help="Phase(s) to run: oracle, library, experts. Default: all.")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--task", help="Primitive task(s) to extract experts for. Default: all.")] = None,
    from_pool: Annotated[Path | None, typer.Option(help="Take the oracle and library phases from this pool (its kept oracle, its library and student head), to retrain its experts only.")] = None,
    keep_pool_widths: Annotated[bool, typer.Option(help="With --from-pool and --expert-widths: the pool's experts at the widths not retrained go into the new pool as they are.")] = False,
    continue_library: Annotated[bool, typer.Option(help="With --from-pool: train the library further, from the pool's library and student head (another schedule of --library-epochs), instead of taking it as it is.")] = False,
    oracle: Annotated[Path | None, typer.Option(help="Bring your own oracle instead of training one: a kept poe oracle (.safetensors with its .json) or any classifier exported to ONNX (.onnx).")] = None,
    oracle_classes: Annotated[Path | None, typer.Option(help="ONNX oracle: its output classes, a JSON list or one name per line (default: the data set's, in order).")] = None,
    oracle_mean: Annotated[str | None, typer.Option(help="ONNX oracle: input normalisation mean as R,G,B (default: the data set's).")] = None,
    oracle_std: Annotated[str | None, typer.Option(help="ONNX oracle: input normalisation std as R,G,B (default: the data set's).")] = None,
    oracle_arch: Annotated[str, typer.Option(help="Oracle as DEPTH,KC,KS[,STRIDE] (WRN; STRIDE of conv1, 2 for 64x64 images) or mobilenet_v2,SPLIT,KC,KS.")] = _arch(DEFAULT.oracle_spec),
    library_arch: Annotated[str, typer.Option(help="Library student, as the oracle (MobileNetV2: its first SPLIT stages are the library).")] = _arch(DEFAULT.library_spec),
    expert_arch: Annotated[str, typer.Option(help="Expert, as the library, of its family and split (KC must match the library).")] = _arch(DEFAULT.expert_spec),
    expert_widths: Annotated[str | None, typer.Option(help="Head widths KS to train jointly, e.g. 0.25,0.5,1 (default: the expert arch's).")] = None,
    expert_init: Annotated[str, typer.Option(help="Experts start from random weights (the paper's) or as the library's student head cut to their width and task (student; WRN only).")] = DEFAULT.expert_cfg.init,
    expert_select: Annotated[str, typer.Option(help="Which epoch each expert keeps: last (the schedule's end) or best (highest validation accuracy).")] = DEFAULT.expert_cfg.select,
    oracle_with_val: Annotated[bool, typer.Option(help="Train the oracle on the validation images too (fixed epochs, last one kept).")] = DEFAULT.oracle_with_val,
    bank_views: Annotated[int, typer.Option(help="Augmented views per training image in the oracle's logit bank; 0 runs the oracle on every batch instead.")] = DEFAULT.bank.views,
    oracle_epochs: int = DEFAULT.oracle_cfg.epochs, library_epochs: int = DEFAULT.library_cfg.epochs,
    expert_epochs: int = DEFAULT.expert_cfg.epochs,
    oracle_lr: float = DEFAULT.oracle_cfg.lr, library_lr: float = DEFAULT.library_cfg.lr,
    expert_lr: float = DEFAULT.expert_cfg.lr,
    batch_size: int = DEFAULT.oracle_cfg.batch_size,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the oracle's loss.")] = DEFAULT.oracle_cfg.label_smoothing,
    schedule: Annotated[str, typer.Option(help="onecycle, cosine, step or constant.")] = DEFAULT.oracle_cfg.schedule,
    library_kd: Annotated[str, typer.Option(help="Library objective: kd (the paper's) or standardized (KD on z-scored logits).")] = DEFAULT.library_cfg.kd,
    temperature: Annotated[float, typer.Option(help="KD temperature of the library and the experts (CKD).")] = DEFAULT.library_cfg.temperature,
    library_temperature: Annotated[float | None, typer.Option(help="KD temperature of the library alone (default --temperature).")] = None,
    alpha: float = DEFAULT.expert_cfg.alpha,
    seed: int = 0,
    split_seed: Annotated[int | None, typer.Option(help="Seed of the validation split (default: --seed), as an extraction job's data.seed.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp16 on CUDA; bf16 on a CPU with AMX or AVX512-BF16, else fp32), fp32, bf16 or fp16.")] = "auto",
    fp16_logits: Annotated[bool, typer.Option(help="Store validation logits as fp16 in the pool.")] = False,
    progress_json: Annotated[bool, typer.Option(help="Report progress as one JSON object per line on stdout (for a supervising process) instead of progress bars.")] = False,
) -> None:
    """Distil the oracle into a library and experts; resumable; writes a pool bundle.
    Under torchrun, data-parallel over its processes (see poe_core.distributed)."""
    from pydantic import ValidationError

    from poe_core import distributed
    from poe_core.extract import PHASES, phase_done, run_phase
    from poe_core.oracle import OracleError
    from poe_core.recipe import ExtractionOptions

    phases = phase or list(PHASES)
    bad = [p for p in phases if p not in PHASES]
    if bad:
        fail(f"unknown phase(s) {', '.join(bad)}; phases: {', '.join(PHASES)}")
    def arch(text: str) -> dict:
        return parse_spec(text).to_dict()

    try:
        options = ExtractionOptions(
            oracle={"arch": arch(oracle_arch), "epochs": oracle_epochs, "lr": oracle_lr, "with_val": oracle_with_val,
                    "file": str(oracle) if oracle else None,
                    "classes": str(oracle_classes) if oracle_classes else None,
                    "mean": _triple(oracle_mean, "--oracle-mean"), "std": _triple(oracle_std, "--oracle-std")},
            library={"arch": arch(library_arch), "epochs": library_epochs, "lr": library_lr, "kd": library_kd,
                     "temperature": library_temperature},
            experts={"arch": arch(expert_arch), "epochs": expert_epochs, "lr": expert_lr,
                     "widths": _widths(expert_widths), "init": expert_init,
                     "select": expert_select},
            tasks=tasks or None, bank_views=bank_views, batch_size=batch_size, schedule=schedule,
            precision=precision, device=device, label_smoothing=label_smoothing, temperature=temperature,
            alpha=alpha, seed=seed)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    plan = options.plan()
    splits = _load(data, data_path, hierarchy, val_per_class, seed if split_seed is None else split_seed, download,
                   size=image_size, resize=resize)
    if tasks:
        _validate_tasks(splits.taxonomy, tasks)
    if from_pool is not None and oracle is not None:
        fail("--from-pool brings the pool's own oracle: leave out --oracle")
    if keep_pool_widths and from_pool is None:
        fail("--keep-pool-widths keeps a pool's experts: give the pool with --from-pool")
    if continue_library and from_pool is None:
        fail("--continue-library starts from a pool's library: give the pool with --from-pool")
    if continue_library and keep_pool_widths:
        fail("--keep-pool-widths keeps experts that fit the pool's library, not a library trained further")
    distributed.init(device)
    try:
        main = distributed.is_main()
        if from_pool is not None:
            from poe_core.extract import seed_from_pool

            with distributed.main_first():  # rank 0 seeds; the others find the phases done
                try:
                    seeded = seed_from_pool(work, _pool(from_pool), splits, continue_library=continue_library)
                except OracleError as e:
                    fail(str(e))
            if seeded and main:
                console.print(f"{', '.join(seeded)} taken from pool {from_pool}")  # the other ranks of a torchrun job train silently
        reports = ProgressBars() if main and not progress_json else contextlib.nullcontext()
        with reports as bars:
            for p in PHASES:
                if p in phases:
                    try:
                        info = run_phase(p, work, splits, plan, _json_progress if progress_json and main else bars)
                    except OracleError as e:
                        fail(str(e))
                    if info.get("val_acc") and main:
                        select = info.get("config", {}).get("select", "best")
                        console.print(f"{p}: {_fmt(info['val_acc'], select)} ({info['seconds']:.0f} s)")
        if keep_pool_widths and main and phase_done(work, "experts"):
            from poe_core.extract import keep_pool_widths as keep

            try:
                kept = keep(work, _pool(from_pool))
            except OracleError as e:
                fail(str(e))
            if kept:
                console.print(f"experts at width(s) {', '.join(f'{w:g}' for w in kept)} kept from pool {from_pool}")
        if out is not None and main:
            from poe_core.pool import build_pool_from_work

            pool = build_pool_from_work(work, out, splits, fp16_logits=fp16_logits, progress=console.print)
            console.print(f"pool {pool.pool_id} written to {out}")
    finally:
        distributed.finish()


def _json_progress(p) -> None:
    print(json.dumps(dataclasses.asdict(p) | {"fraction": p.fraction}), flush=True)


def _triple(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or (flag.endswith("std") and min(values) <= 0):
        fail(f"{flag} {text!r} is not three numbers R,G,B" + (" above 0" if flag.endswith("std") else ""))
    return values


def _widths(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        widths = sorted({float(v) for v in text.split(",")})
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        fail(f"--expert-widths {text!r} is not a list of positive numbers like 0.25,0.5,1")
    return widths


def _fmt(val_acc: dict, select: str = "best") -> str:
    values = list(val_acc.values())
    if all(v < 0 for v in values):  # the phase's sentinel: it trained on the validation images too
        return "no validation accuracy (trained on the validation images too)"
    kept = "best validation accuracy" if select == "best" else "validation accuracy of the last epoch"
    return (f"{kept} {sum(values) / len(values):.2%}"
            + (" (mean over experts)" if len(values) > 1 else ""))


def _load(data, data_path, hierarchy, val_per_class, seed, download, size=32, resize=None):
    try:
        return load_splits(data, data_path, hierarchy=hierarchy, val_per_class=val_per_class,
                           seed=seed, download=download, size=size, resize=resize)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))


def _validate_tasks(taxonomy, tasks):
    from poe_core.taxonomy import TaskError

    try:
        return taxonomy.validate(tasks)
    except TaskError as e:
        fail(str(e))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


def _pool(path: Path):
    from poe_core.pool import PoolError, load_pool

    try:
        return load_pool(path)
    except PoolError as e:
        fail(str(e))


MANY_TASKS = {"allow_extra_args": True, "ignore_unknown_options": False}


@app.command(context_settings=MANY_TASKS)
def query(
    ctx: typer.Context,
    pool: Annotated[Path, typer.Option(help="Pool bundle directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")],
    tasks: Annotated[list[str] | None, typer.Option("--tasks", "-t", help="Primitive tasks of the composite task.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--classes", "-c", help="Classes to output (alone or with tasks).")] = None,
    method: Annotated[str, typer.Option(help="poe (experts) or mask (the library student, restricted).")] = "poe",
    softmax: Annotated[bool, typer.Option(help="Output probabilities instead of logits.")] = False,
    weights: Annotated[str, typer.Option(help="Weight format: fp32, fp16 or int8.")] = "fp32",
    reject_output: Annotated[bool, typer.Option(help="Add the output `accepted` (the \"none of these\" rule).")] = False,
    ort: Annotated[bool, typer.Option("--ort", help="Write ORT format (onnxruntime-mobile) instead of ONNX.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
) -> None:
    """Assemble the model for tasks and/or classes into an ONNX file (no training)."""
    import json
    import time

    from poe_core.assemble import Assembler
    from poe_core.files import atomic_write

    loaded = _pool(pool)
    q = _query(loaded, _split_words((tasks or []) + ctx.args), _split_words(classes or []), method)
    assembler = Assembler(loaded)
    t0 = time.perf_counter()
    try:
        reject = loaded.reject_rule(q, weights)
        model = assembler.assemble(q, softmax=softmax, weights=weights, reject=reject, reject_output=reject_output)
    except ValueError as e:  # unknown or refused format
        fail(str(e))
    data = model.data
    if ort:
        from poe_core.formats import to_ort

        data = to_ort(data)
    ms = (time.perf_counter() - t0) * 1000
    atomic_write(output, data)
    summary = {"output": str(output), "pool_id": loaded.pool_id, "method": q.method, "tasks": list(q.tasks),
               "widths": list(q.widths), "labels": list(model.labels), "weights": weights,
               "format": "ort" if ort else "onnx", "params": loaded.params(q), "flops": loaded.flops(q),
               "bytes": len(data), "val_acc": loaded.accuracy(q, weights), "reject": reject.to_dict(),
               "built_ms": round(ms, 3)}
    if as_json:
        print(json.dumps(summary))
        return
    console.print(f"{output}: {len(model.labels)} classes from {len(q.tasks)} experts ({q.method}), {weights} "
                  f"weights, {summary['params']:,} parameters, {len(data):,} bytes, validation accuracy "
                  f"{summary['val_acc']:.2%}, rejects {_fmt_rate(reject.reject_rate_out_of_task)} of other "
                  f"validation images by {reject.score}, built in {ms:.2f} ms")


def _fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _query(loaded, tasks: list[str], classes: list[str], method: str = "poe"):
    from poe_core.formats import Unavailable
    from poe_core.taxonomy import TaskError

    try:
        return loaded.query(tasks, classes, method=method)
    except (TaskError, Unavailable) as e:
        fail(str(e))


@app.command("eval", context_settings=MANY_TASKS)
def evaluate(
    ctx: typer.Context,
    pool: Annotated[Path, typer.Option(help="Pool bundle directory.")],
    tasks: Annotated[list[str], typer.Option("--tasks", "-t", help="Primitive tasks of the composite task.")],
    split: Annotated[str, typer.Option(help="val (from the cached logits) or test (runs the model).")] = "val",
    data: Annotated[str, typer.Option(help=f"Data source for --split test: {', '.join(SOURCES)}.")] = "cifar100-npy",
    data_path: Annotated[Path | None, typer.Option(help="Data directory for --split test.")] = None,
    hierarchy: Annotated[Path | None, typer.Option(help="image-folder: the task -> classes JSON the pool was built from (needed when the class folders are WordNet ids); default: the folders are named by the pool's classes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object on stdout.")] = False,
) -> None:
    """Accuracy of a composite task from a pool, on the validation or the test split."""
    loaded = _pool(pool)
    names = _validate_tasks(loaded.taxonomy, _split_words(tasks + ctx.args))
    if split == "val":
        acc = loaded.composite_accuracy(names)
        cross = loaded.cross_expert_error_share(names)
    elif split == "test":
        import torch

        from poe_core.evaluate import cross_expert_error_share, predict, task_specific_accuracy

        test = _test_split(data, data_path, hierarchy, loaded)
        if test is None:
            fail(f"data source {data} has no test split")
        test = test.of_classes(loaded.taxonomy.composite_classes(names))
        logits = predict(loaded.branched_model(names), test, loaded.mean, loaded.std, torch.device("cpu"))
        acc = task_specific_accuracy(logits, test.y, loaded.taxonomy.composite_classes(names))
        per_expert = dict(zip(names, logits.split([len(loaded.taxonomy.tasks[t]) for t in names], 1),
                              strict=True))
        cross = cross_expert_error_share(per_expert, test.y, loaded.taxonomy, names)
    else:
        fail(f"unknown split {split!r}; use val or test")
    if as_json:
        import json

        print(json.dumps({"tasks": names, "split": split, "accuracy": acc, "cross_expert_error_share": cross,
                          "params": loaded.composite_params(names), "flops": loaded.composite_flops(names)}))
        return
    print(f"{'+'.join(names)}: {split} accuracy {acc:.2%}, cross-expert errors {cross:.0%} of errors, "
          f"{loaded.composite_params(names):,} parameters, {loaded.composite_flops(names):,} FLOPs")


def _test_split(data, data_path, hierarchy, pool):
    """The test images of `data` at the pool's input, labelled by the pool's classes; an
    image folder's alone (its training photos are not loaded), through `hierarchy` or
    the pool's class names as folders."""
    from poe_core.data import load_image_folder_test

    size = input_options(pool.image_shape, pool.spec.dataset.preprocess)
    if data != "image-folder":
        return _load(data, data_path, None, 50, 0, False, **size).test
    if data_path is None:
        fail("data source image-folder needs a path")
    try:
        return load_image_folder_test(data_path, pool.taxonomy.classes, hierarchy, **size)
    except FileNotFoundError as e:
        fail(str(e) + ("" if hierarchy else " (--hierarchy: the JSON the pool was built from, "
                                            "when the class folders are not named by the classes)"))
    except (OSError, ValueError) as e:
        fail(str(e))


def _split_words(values: list[str]) -> list[str]:
    """Accept `-t a b`, `-t a -t b` and `-t a,b`."""
    return [w for v in values for w in v.replace(",", " ").split()]


@app.command("add-task", context_settings=MANY_TASKS)
def add_task(
    ctx: typer.Context,
    pool: Annotated[Path, typer.Option(help="Pool bundle directory (with a kept oracle).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the extended pool bundle.")],
    name: Annotated[str, typer.Option(help="The new primitive task's name.")],
    classes: Annotated[list[str], typer.Option("--classes", "-c", help="Its classes, in output order.")],
    work: Annotated[Path, typer.Option(help="Work directory: logit bank and checkpoint (resumable).")],
    data: Annotated[str, typer.Option(help=f"Data source the pool was built on: {', '.join(SOURCES)}.")] = "cifar100-npy",
    data_path: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    hierarchy: Annotated[Path | None, typer.Option(help="image-folder: task -> classes JSON.")] = None,
    val_per_class: Annotated[int, typer.Option(help="As when the pool was built.")] = 50,
    split_seed: Annotated[int, typer.Option(help="As when the pool was built.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Default: the pool's experts' recipe.")] = None,
    lr: Annotated[float | None, typer.Option(help="Default: the pool's experts' recipe.")] = None,
    init: Annotated[str | None, typer.Option(help="random or student (cut from the library's student head). Default: the pool's experts' recipe.")] = None,
    bank_views: Annotated[int, typer.Option(help="Views of a logit bank filled here if none is found.")] = COLD_VIEWS,
    bank_others: Annotated[int, typer.Option(help="Images of each class outside the task that a bank filled here "
                                                  "covers, besides all of the task's; -1: every image.")] = COLD_OTHERS_PER_CLASS,
    bank_from: Annotated[list[Path] | None, typer.Option(help="Work directories to look for a bank of the "
                                                               "pool's oracle in (e.g. the pool's extraction).")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Add a primitive task to a pool: its expert trained by CKD from the pool's kept oracle."""
    from poe_core.extend import ExtensionError, default_config
    from poe_core.extend import add_task as extend

    loaded = _pool(pool)
    splits = _load(data, data_path, hierarchy, val_per_class, split_seed, False,
                   **input_options(loaded.image_shape, loaded.spec.dataset.preprocess))
    if init not in (None, "random", "student"):
        fail(f"--init {init}: use random or student")
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("init", init)) if v is not None}
    cfg = dataclasses.replace(default_config(loaded), precision=precision, device=device, **overrides)
    try:
        new = extend(loaded, out, splits, name, _split_words(classes + ctx.args), work=work, cfg=cfg,
                     views=bank_views, others_per_class=None if bank_others < 0 else bank_others,
                     bank_dirs=bank_from or [], say=console.print)
    except ExtensionError as e:
        fail(str(e))
    console.print(f"{out}: pool {new.pool_id} with {len(new.tasks)} primitive tasks; {name}: validation "
                  f"accuracy {new.part(name).val_acc:.2%}")


if __name__ == "__main__":
    main()
