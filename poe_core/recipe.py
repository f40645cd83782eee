"""What an extraction trains and how: the one place its defaults live.

`ExtractionPlan()` is the default recipe; the `poe extract` options, the admin API's
extraction request and the worker all start from it, so they cannot disagree. Nothing
here imports the training loops (the API process reads plans; only workers train).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from poe_core.bank import ViewRecipe
from poe_core.nets import FAMILIES, ArchSpec, MobileNetV2Spec, WRNSpec, check_continues


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | step | constant
    label_smoothing: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (by hardware, see poe_core.device) | fp32 | bf16 | fp16
    kd: str = "kd"  # library phase: kd (eq. 1) | standardized (KD on z-scored logits)
    init: str = "random"  # expert phase: random | student (heads cut from the library's student, poe_core.prune)
    # Which epoch's weights a phase keeps: best (highest validation accuracy) or last (the
    # schedule's end; validation is still measured and reported). Experts keep the last:
    # chosen on one half of validation and scored on the other, the best epoch lost 2
    # points single and 3-4 on composites to the last (benchmarks/selection.py).
    select: str = "best"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """One report of a running phase; `val_acc` is set at the end of an epoch."""

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    val_acc: float | None = None

    @property
    def fraction(self) -> float:
        return ((self.epoch - 1) * self.steps + self.step) / max(1, self.epochs * self.steps)


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class ExternalOracle:
    """An oracle the operator brings instead of training one: a kept poe oracle
    (`.safetensors` with its `.json` beside it) or any classifier exported to ONNX,
    with the list of classes its outputs stand for and the normalisation it expects
    (default: the data set's)."""

    path: Path
    classes: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def kind(self) -> str:
        return "onnx" if self.path.suffix == ".onnx" else "poe"


@dataclass
class ExtractionPlan:
    oracle_spec: ArchSpec = field(default_factory=lambda: WRNSpec(16, 4, 4))
    library_spec: ArchSpec = field(default_factory=lambda: WRNSpec(16, 1, 1))
    expert_spec: ArchSpec = field(default_factory=lambda: WRNSpec(16, 1, 0.25))
    oracle_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, label_smoothing=0.1))
    library_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15))
    expert_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.05, select="last"))
    tasks: Sequence[str] | None = None  # None: every primitive task of the taxonomy
    oracle_with_val: bool = False  # train the oracle on the validation images too (see train_oracle)
    expert_widths: Sequence[float] | None = None  # head widths ks trained jointly; None: expert_spec.ks
    bank: ViewRecipe | None = field(default_factory=ViewRecipe)  # None: run the oracle on every batch
    oracle: ExternalOracle | None = None  # None: train the oracle (phase "oracle")

    @property
    def widths(self) -> list[float]:
        return list(self.expert_widths or [self.expert_spec.ks])


# A task added to a pool (poe_core.extend): its epochs at most (unless asked for more);
# a logit bank filled for it when none is found to reuse: its views, and how many
# images of each class outside the task it covers besides all of the task's
# (poe_core.extend.cold_images). Chosen for a new expert in about 5 minutes on 2 cores.
TASK_EPOCHS = 6
COLD_VIEWS = 2
COLD_OTHERS_PER_CLASS = 20


# The request form of a plan: what `poe extract` and the admin API accept, validated at
# the edge, with every default taken from ExtractionPlan() and one mapping to a plan.

_DEFAULT = ExtractionPlan()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Architecture(_Strict):
    """A network of one family (see poe_core.nets): WRN-depth-(kc, ks) with conv1's
    stride, or MobileNetV2 split after `split` stages, library width kc, head width ks."""

    family: Literal["wrn", "mobilenet_v2"] = "wrn"
    depth: int | None = Field(None, ge=10, le=100, description="WRN: 6n+4.")
    split: int | None = Field(None, ge=1, le=6, description="MobileNetV2: inverted-residual stages in the library "
                                                            "(the rest, at width ks, are each expert's).")
    kc: float = Field(gt=0, le=16, description="Library width (WRN: widening factor; MobileNetV2: multiplier).")
    ks: float = Field(gt=0, le=16, description="Expert head width (as kc).")
    stride: int = Field(1, ge=1, le=4, description="WRN: stride of conv1 (2 for 64x64 inputs, as for Tiny-ImageNet).")

    @field_validator("depth")
    @classmethod
    def _wrn_depth(cls, depth: int | None) -> int | None:
        if depth is not None and (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...)")
        return depth

    @model_validator(mode="after")
    def _family_fields(self) -> Architecture:
        if self.family == "wrn" and (self.depth is None or self.split is not None):
            raise ValueError("a WRN takes depth (and no split)")
        if self.family == "mobilenet_v2" and (self.split is None or self.depth is not None or self.stride != 1):
            raise ValueError("a MobileNetV2 takes split (and no depth or stride)")
        return self

    @classmethod
    def of(cls, spec: ArchSpec) -> Architecture:
        return cls(**spec.to_dict())

    def spec(self) -> ArchSpec:
        if self.family == "mobilenet_v2":
            return MobileNetV2Spec(self.split, self.kc, self.ks)
        return WRNSpec(self.depth, self.kc, self.ks, self.stride)

    def text(self) -> str:
        """The `poe extract --*-arch` form: DEPTH,KC,KS[,STRIDE] or mobilenet_v2,SPLIT,KC,KS."""
        if self.family == "mobilenet_v2":
            return f"mobilenet_v2,{self.split},{_exact(self.kc)},{_exact(self.ks)}"
        return f"{self.depth},{_exact(self.kc)},{_exact(self.ks)}" + (f",{self.stride}" if self.stride != 1 else "")

    @classmethod
    def parse(cls, text: str) -> Architecture:
        """The inverse of `text`; ValueError (pydantic's ValidationError is one) if malformed."""
        items = text.split(",")
        if items[0] in FAMILIES:
            family, items = items[0], items[1:]
        else:
            family = "wrn"
        names = ("split", "kc", "ks") if family == "mobilenet_v2" else ("depth", "kc", "ks", "stride")
        if not 3 <= len(items) <= len(names):
            raise ValueError(f"architecture {text!r} is not DEPTH,KC,KS[,STRIDE] or mobilenet_v2,SPLIT,KC,KS")
        return cls(family=family, **dict(zip(names, items, strict=False)))


def _exact(x: float) -> str:
    """The shortest text that reads back as x."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


# A path the file system can take: no NUL byte.
FilePath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
Triple = Annotated[list[float], Field(min_length=3, max_length=3)]


class OracleOptions(_Strict):
    arch: Architecture = Field(default_factory=lambda: Architecture.of(_DEFAULT.oracle_spec))
    epochs: int = Field(_DEFAULT.oracle_cfg.epochs, ge=1, le=1000)
    lr: float = Field(_DEFAULT.oracle_cfg.lr, gt=0, le=10)
    with_val: bool = Field(_DEFAULT.oracle_with_val, description="Train the oracle on the validation images "
                                                                  "too (fixed epochs, its last one kept).")
    file: FilePath | None = Field(None, description="Bring your own oracle instead of training one: a kept poe "
                                                    "oracle (.safetensors with its .json) or any classifier "
                                                    "exported to ONNX (.onnx).")
    classes: FilePath | None = Field(None, description="ONNX oracle: its output classes (JSON list or one per "
                                                       "line); default the data set's, in order.")
    mean: Triple | None = Field(None, description="ONNX oracle: input normalisation mean (R, G, B).")
    std: Triple | None = Field(None, description="ONNX oracle: input normalisation std (R, G, B).")

    @model_validator(mode="after")
    def _external_only(self) -> OracleOptions:
        if self.file is None and (self.classes or self.mean or self.std):
            raise ValueError("classes, mean and std describe a brought oracle: give its file too")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std must be above 0")
        return self


class LibraryOptions(_Strict):
    arch: Architecture = Field(default_factory=lambda: Architecture.of(_DEFAULT.library_spec))
    epochs: int = Field(_DEFAULT.library_cfg.epochs, ge=1, le=1000)
    lr: float = Field(_DEFAULT.library_cfg.lr, gt=0, le=10)
    kd: Literal["kd", "standardized"] = Field(_DEFAULT.library_cfg.kd, description="kd: the paper's; "
                                              "standardized: KD on z-scored logits (Sun et al. 2024).")
    temperature: float | None = Field(None, gt=0, description="KD temperature of the library phase; default the "
                                      "shared temperature (z-scored logits want a lower one, e.g. 2).")


class ExpertOptions(_Strict):
    arch: Architecture = Field(default_factory=lambda: Architecture.of(_DEFAULT.expert_spec))
    epochs: int = Field(_DEFAULT.expert_cfg.epochs, ge=1, le=1000)
    lr: float = Field(_DEFAULT.expert_cfg.lr, gt=0, le=10)
    widths: list[Annotated[float, Field(gt=0, le=16)]] | None = Field(
        None, min_length=1, max_length=8, description="Head widths ks trained jointly; default arch.ks only.")
    init: Literal["random", "student"] = Field(_DEFAULT.expert_cfg.init, description="random: the paper's; "
                                               "student: each head starts as the library's student head, pruned to "
                                               "its width and task (WRN experts).")
    select: Literal["last", "best"] = Field(_DEFAULT.expert_cfg.select, description="Which epoch each expert keeps: "
                                            "last (the schedule's end) or best (highest validation accuracy, "
                                            "which picks noise on small tasks).")


class ExtractionOptions(_Strict):
    oracle: OracleOptions = Field(default_factory=OracleOptions)
    library: LibraryOptions = Field(default_factory=LibraryOptions)
    experts: ExpertOptions = Field(default_factory=ExpertOptions)
    tasks: list[str] | None = Field(None, min_length=1, json_schema_extra={"uniqueItems": True},
                                    description="Primitive tasks to train experts for; default all of the data set's.")
    bank_views: int = Field(_DEFAULT.bank.views, ge=0, le=64, description="Augmented views per training image in "
                            "the oracle's logit bank; 0 runs the oracle on every batch (not for ONNX oracles).")
    batch_size: int = Field(_DEFAULT.oracle_cfg.batch_size, ge=1, le=4096)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = _DEFAULT.oracle_cfg.schedule
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    label_smoothing: float = Field(_DEFAULT.oracle_cfg.label_smoothing, ge=0, lt=1,
                                   description="Label smoothing of the oracle's cross-entropy.")
    temperature: float = Field(_DEFAULT.library_cfg.temperature, gt=0)
    alpha: float = Field(_DEFAULT.expert_cfg.alpha, ge=0)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _experts_fit_the_library(self) -> ExtractionOptions:
        check_continues(self.library.arch.spec(), self.experts.arch.spec())
        return self

    @model_validator(mode="after")
    def _onnx_needs_a_bank(self) -> ExtractionOptions:
        if self.oracle.file and self.oracle.file.endswith(".onnx") and self.bank_views == 0:
            raise ValueError("an ONNX oracle is read through the logit bank: bank_views must be at least 1")
        return self

    def plan(self, resolve: Callable[[str], Path] = Path) -> ExtractionPlan:
        """The plan these options describe; `resolve` turns the oracle's file names into
        paths (the API resolves them under its data roots)."""
        common = dict(batch_size=self.batch_size, schedule=self.schedule, temperature=self.temperature,
                      alpha=self.alpha, seed=self.seed, device=self.device, precision=self.precision)
        o = self.oracle
        external = None
        if o.file is not None:
            external = ExternalOracle(resolve(o.file), resolve(o.classes) if o.classes else None,
                                      tuple(o.mean) if o.mean else None, tuple(o.std) if o.std else None)
        return ExtractionPlan(
            o.arch.spec(), self.library.arch.spec(), self.experts.arch.spec(),
            TrainConfig(epochs=o.epochs, lr=o.lr, label_smoothing=self.label_smoothing, **common),
            TrainConfig(epochs=self.library.epochs, lr=self.library.lr, kd=self.library.kd,
                        **common | ({} if self.library.temperature is None else
                                    {"temperature": self.library.temperature})),
            TrainConfig(epochs=self.experts.epochs, lr=self.experts.lr, init=self.experts.init,
                        select=self.experts.select, **common),
            self.tasks, o.with_val, self.experts.widths,
            ViewRecipe(self.bank_views, seed=self.seed) if self.bank_views else None, external,
        )
