"""The `poe` command line: extract a pool, query a composite model, evaluate one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from poe_core.data import SOURCES, load_splits
from poe_core.nets import WRNSpec
from poe_core.train import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pool of Experts: distil an oracle into a pool, assemble models from it.")
console = Console(stderr=True)


@app.callback()
def root() -> None:
    """Pool of Experts: distil an oracle into a pool, assemble models from it."""


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def parse_spec(text: str) -> WRNSpec:
    try:
        depth, kc, ks = text.split(",")
        return WRNSpec(int(depth), float(kc), float(ks))
    except ValueError:
        fail(f"architecture {text!r} is not DEPTH,KC,KS (e.g. 16,4,4)")


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


@app.command()
def extract(
    work: Annotated[Path, typer.Option(help="Work directory: checkpoints and finished phases.")],
    out: Annotated[Path | None, typer.Option(help="Pool directory to write when all phases are done.")] = None,
    data: Annotated[str, typer.Option(help=f"Data source: {', '.join(SOURCES)}.")] = "cifar100-npy",
    data_path: Annotated[Path | None, typer.Option(help="Data directory (or torchvision root).")] = None,
    hierarchy: Annotated[Path | None, typer.Option(help="Task -> classes JSON for image-folder.")] = None,
    download: Annotated[bool, typer.Option(help="Let torchvision download CIFAR-100.")] = False,
    val_per_class: Annotated[int, typer.Option(help="Validation images held out per class.")] = 50,
    phase: Annotated[list[str] | None, typer.Option(help="Phase(s) to run: oracle, library, experts. Default: all.")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--task", help="Primitive task(s) to extract experts for. Default: all.")] = None,
    oracle_arch: Annotated[str, typer.Option(help="Oracle WRN as DEPTH,KC,KS.")] = "16,4,4",
    library_arch: Annotated[str, typer.Option(help="Library student WRN as DEPTH,KC,KS.")] = "16,1,1",
    expert_arch: Annotated[str, typer.Option(help="Expert WRN as DEPTH,KC,KS (KC must match the library).")] = "16,1,0.25",
    oracle_with_val: Annotated[bool, typer.Option(help="Train the oracle on the validation images too (fixed epochs, last one kept).")] = False,
    oracle_epochs: int = 15, library_epochs: int = 15, expert_epochs: int = 10,
    oracle_lr: float = 0.1, library_lr: float = 0.1, expert_lr: float = 0.05,
    batch_size: int = 128,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the oracle's loss.")] = 0.1,
    schedule: Annotated[str, typer.Option(help="onecycle, cosine, step or constant.")] = "onecycle",
    temperature: float = 4.0, alpha: float = 0.3, seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp16 on CUDA; bf16 on a CPU with AMX or AVX512-BF16, else fp32), fp32, bf16 or fp16.")] = "auto",
    fp16_logits: Annotated[bool, typer.Option(help="Store validation logits as fp16 in the pool.")] = False,
) -> None:
    """Distil the oracle into a library and experts; resumable; writes a pool bundle."""
    from poe_core.extract import PHASES, ExtractionPlan, run_phase

    phases = phase or list(PHASES)
    bad = [p for p in phases if p not in PHASES]
    if bad:
        fail(f"unknown phase(s) {', '.join(bad)}; phases: {', '.join(PHASES)}")
    if schedule not in ("onecycle", "cosine", "step", "constant"):
        fail(f"unknown schedule {schedule!r}; use onecycle, cosine, step or constant")
    common = dict(batch_size=batch_size, schedule=schedule, temperature=temperature, alpha=alpha,
                  seed=seed, device=device, precision=precision)
    plan = ExtractionPlan(
        parse_spec(oracle_arch), parse_spec(library_arch), parse_spec(expert_arch),
        TrainConfig(epochs=oracle_epochs, lr=oracle_lr, label_smoothing=label_smoothing, **common),
        TrainConfig(epochs=library_epochs, lr=library_lr, **common),
        TrainConfig(epochs=expert_epochs, lr=expert_lr, **common),
        tasks,
        oracle_with_val,
    )
    splits = _load(data, data_path, hierarchy, val_per_class, seed, download)
    if tasks:
        _validate_tasks(splits.taxonomy, tasks)
    with ProgressBars() as bars:
        for p in PHASES:
            if p in phases:
                info = run_phase(p, work, splits, plan, bars)
                console.print(f"{p}: best validation accuracy {_fmt(info['val_acc'])} "
                              f"({info['seconds']:.0f} s)")
    if out is not None:
        from poe_core.pool import build_pool_from_work

        pool = build_pool_from_work(work, out, splits, fp16_logits=fp16_logits, progress=console.print)
        console.print(f"pool {pool.pool_id} written to {out}")


def _fmt(val_acc: dict) -> str:
    values = list(val_acc.values())
    return f"{sum(values) / len(values):.2%}" + (" (mean over experts)" if len(values) > 1 else "")


def _load(data, data_path, hierarchy, val_per_class, seed, download):
    try:
        return load_splits(data, data_path, hierarchy=hierarchy, val_per_class=val_per_class,
                           seed=seed, download=download)
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
    tasks: Annotated[list[str], typer.Option("--tasks", "-t", help="Primitive tasks of the composite task.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")],
    softmax: Annotated[bool, typer.Option(help="Output probabilities instead of logits.")] = False,
    weights: Annotated[str, typer.Option(help="Weight format: fp32, fp16 or int8.")] = "fp32",
    ort: Annotated[bool, typer.Option("--ort", help="Write ORT format (onnxruntime-mobile) instead of ONNX.")] = False,
) -> None:
    """Assemble the composite model for a task list into an ONNX file (no training)."""
    import time

    from poe_core.assemble import Assembler

    loaded = _pool(pool)
    names = _validate_tasks(loaded.taxonomy, _split_words(tasks + ctx.args))
    assembler = Assembler(loaded)
    t0 = time.perf_counter()
    try:
        model = assembler.assemble(names, softmax=softmax, weights=weights)
    except ValueError as e:  # unknown or refused format
        fail(str(e))
    data = model.data
    if ort:
        from poe_core.formats import to_ort

        data = to_ort(data)
    ms = (time.perf_counter() - t0) * 1000
    output.write_bytes(data)
    console.print(f"{output}: {len(model.labels)} classes from {len(names)} experts, {weights} weights, "
                  f"{loaded.composite_params(names):,} parameters, {len(data):,} bytes, validation accuracy "
                  f"{loaded.composite_accuracy(names, weights=weights):.2%}, built in {ms:.2f} ms")


@app.command("eval", context_settings=MANY_TASKS)
def evaluate(
    ctx: typer.Context,
    pool: Annotated[Path, typer.Option(help="Pool bundle directory.")],
    tasks: Annotated[list[str], typer.Option("--tasks", "-t", help="Primitive tasks of the composite task.")],
    split: Annotated[str, typer.Option(help="val (from the cached logits) or test (runs the model).")] = "val",
    data: Annotated[str, typer.Option(help=f"Data source for --split test: {', '.join(SOURCES)}.")] = "cifar100-npy",
    data_path: Annotated[Path | None, typer.Option(help="Data directory for --split test.")] = None,
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

        splits = _load(data, data_path, None, 50, 0, False)
        if splits.test is None:
            fail(f"data source {data} has no test split")
        test = splits.test.of_classes(loaded.taxonomy.composite_classes(names))
        logits = predict(loaded.branched_model(names), test, loaded.mean, loaded.std, torch.device("cpu"))
        acc = task_specific_accuracy(logits, test.y, loaded.taxonomy.composite_classes(names))
        per_expert = dict(zip(names, logits.split([len(loaded.taxonomy.tasks[t]) for t in names], 1),
                              strict=True))
        cross = cross_expert_error_share(per_expert, test.y, loaded.taxonomy, names)
    else:
        fail(f"unknown split {split!r}; use val or test")
    print(f"{'+'.join(names)}: {split} accuracy {acc:.2%}, cross-expert errors {cross:.0%} of errors, "
          f"{loaded.composite_params(names):,} parameters, {loaded.composite_flops(names):,} FLOPs")


def _split_words(values: list[str]) -> list[str]:
    """Accept `-t a b`, `-t a -t b` and `-t a,b`."""
    return [w for v in values for w in v.replace(",", " ").split()]


if __name__ == "__main__":
    main()
