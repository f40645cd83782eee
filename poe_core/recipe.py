"""What an extraction trains and how: the one place its defaults live.

`ExtractionPlan()` is the default recipe; the `poe extract` options, the admin API's
extraction request and the worker all start from it, so they cannot disagree. Nothing
here imports the training loops (the API process reads plans; only workers train).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from poe_core.bank import ViewRecipe
from poe_core.nets import WRNSpec


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
        return "onnx" if self.path.suffix == ".onnx" else "poe-wrn"


@dataclass
class ExtractionPlan:
    oracle_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 4, 4))
    library_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 1, 1))
    expert_spec: WRNSpec = field(default_factory=lambda: WRNSpec(16, 1, 0.25))
    oracle_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, label_smoothing=0.1))
    library_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15))
    expert_cfg: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.05))
    tasks: Sequence[str] | None = None  # None: every primitive task of the taxonomy
    oracle_with_val: bool = False  # train the oracle on the validation images too (see train_oracle)
    expert_widths: Sequence[float] | None = None  # head widths ks trained jointly; None: expert_spec.ks
    bank: ViewRecipe | None = field(default_factory=ViewRecipe)  # None: run the oracle on every batch
    oracle: ExternalOracle | None = None  # None: train the oracle (phase "oracle")

    @property
    def widths(self) -> list[float]:
        return list(self.expert_widths or [self.expert_spec.ks])
