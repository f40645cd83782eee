"""Request and response bodies at the edge of the API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from poe_core.data import SOURCES
from poe_core.recipe import COLD_OTHERS_PER_CLASS, COLD_VIEWS, ExtractionOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


WeightFormat = Literal["fp32", "fp16", "int8"]
FileFormat = Literal["onnx", "ort"]


class BudgetOptions(Strict):
    max_params: int | None = Field(None, ge=1, le=2**62, description="Parameters of the whole model.")
    max_bytes: int | None = Field(None, ge=1, le=2**62, description="Bytes of the ONNX file in the chosen weight "
                                                                     "format (without softmax or reject output).")
    max_macs: int | None = Field(None, ge=1, le=2**62, description="Multiply-accumulates of one image.")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetOptions:
        if self.max_params is None and self.max_bytes is None and self.max_macs is None:
            raise ValueError("a budget needs max_params, max_bytes or max_macs")
        return self


class ModelOptions(Strict):
    softmax: bool = Field(False, description="Append a Softmax: the model outputs probabilities.")
    weights: WeightFormat | None = Field(
        None, description="fp32 (default); fp16: float16 weights cast back in the graph (half the bytes, "
                          "fp32 arithmetic); int8: onnxruntime static quantization (QDQ), refused with "
                          "422 and the pool's reason when it loses more than a point of accuracy.")
    fp16: bool = Field(False, description="Same as weights=\"fp16\" (kept for older clients).")
    format: FileFormat = Field("onnx", description="onnx, or ort: the ORT format of onnxruntime-mobile, "
                                                   "converted by onnxruntime at query time.")
    method: Literal["poe", "mask"] = Field(
        "poe", description="poe: library + experts; mask: SMART's baseline, the library student's own head "
                           "over all classes restricted to the query's (422 with the reason if the pool keeps "
                           "no student head).")
    widths: dict[str, float] | None = Field(
        None, description="Expert width (ks) per task of the query; others get the pool's default. Not with "
                          "mask or budget.")
    budget: BudgetOptions | None = Field(
        None, description="Pick per task the widths that maximise validation accuracy within these limits "
                          "(422 stating the smallest possible if nothing fits).")
    reject_output: bool = Field(False, description="Add an output `accepted` (bool per image): the reject rule "
                                                   "computed in the graph, stated as poe.reject in its metadata.")

    @model_validator(mode="after")
    def _one_weight_format(self) -> ModelOptions:
        if self.fp16 and self.weights not in (None, "fp16"):
            raise ValueError(f"fp16: true contradicts weights: {self.weights!r}; send only weights")
        return self

    @property
    def weight_format(self) -> str:
        return self.weights or ("fp16" if self.fp16 else "fp32")


class ModelRequest(Strict):
    # Either list or both; uniqueItems is said, and checked with the names against the pool (422).
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"anyOf": [{"required": ["tasks"]}, {"required": ["classes"]}]})
    tasks: list[str] | None = Field(None, min_length=1, description="Primitive task names; the composite task "
                                                                    "is their union. Order does not matter: "
                                                                    "outputs follow the sorted task order.",
                                    examples=[["people", "vehicles_1"]], json_schema_extra={"uniqueItems": True})
    classes: list[str] | None = Field(
        None, min_length=1, description="Class names, alone or besides tasks: the model holds the experts that "
                                        "cover them and outputs the tasks' classes, then these, in the order "
                                        "given.",
        examples=[["bicycle", "woman"]], json_schema_extra={"uniqueItems": True})
    options: ModelOptions = Field(default_factory=ModelOptions)

    @model_validator(mode="after")
    def _something_asked(self) -> ModelRequest:
        if self.tasks is None and self.classes is None:
            raise ValueError("name tasks, classes or both")
        return self


class InputSpec(BaseModel):
    """What the model takes and how a photo becomes it (the model's poe.input and
    poe.mean/poe.std say the same)."""

    name: str = "input"
    shape: list[int | str] = Field(description="NCHW, batch dimension dynamic.")
    mean: list[float]
    std: list[float]
    scale: str = "pixel / 255, then (x - mean) / std, RGB"
    resize_shorter_side: int | None = Field(
        None, description="Resize the photo (bilinear) so its shorter side has this many pixels, then cut the "
                          "central center_crop x center_crop; null: the pool's images were stored at the input "
                          "size (resize the shorter side to the input's side and center-crop).")
    center_crop: int | None = Field(None, description="Side of the central square cut after the resize; "
                                                      "null with resize_shorter_side.")

    @classmethod
    def of(cls, image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
           preprocess: dict | None) -> InputSpec:
        """From a pool's dataset.image_shape, normalisation and dataset.preprocess."""
        return cls(shape=["batch", *image_shape], mean=list(mean), std=list(std), **(preprocess or {}))


class RejectOut(BaseModel):
    score: Literal["max_softmax", "energy"] = Field(description="max_softmax: the largest softmax probability; "
                                                                "energy: logsumexp of the logits.")
    threshold: float = Field(description="Accept (one of the model's classes) when score >= threshold; below: "
                                         "none of these.")
    accept_rate_in_task: float = Field(description="Share of the validation images of the model's classes "
                                                   "accepted (at least 0.95).")
    reject_rate_out_of_task: float | None = Field(description="Share of the other validation images rejected; "
                                                              "null when the model covers every class.")
    auroc: float | None = Field(description="In-task vs. out-of-task validation images, by the score.")


class MaskOut(BaseModel):
    val_acc: float | None = Field(description="What SMART's mask baseline scores on the same query.")
    params: int | None
    unavailable: str | None = Field(description="Why the pool cannot say (no student head).")


class ModelOut(BaseModel):
    id: str
    pool_version: int
    pool_id: str
    tasks: list[str] = Field(description="The experts, in the order of the model's outputs.")
    labels: list[str] = Field(description="Class label of every output column, in order.")
    output: Literal["logits", "probabilities"]
    weights: WeightFormat
    format: FileFormat = Field(description="onnx or ort; bytes and sha256 are those of this file.")
    method: Literal["poe", "mask"]
    widths: dict[str, float] = Field(description="Expert width (ks) per task, in task order; empty for mask.")
    params: int
    flops: int = Field(description="Multiply-accumulates of one image.")
    bytes: int
    sha256: str
    val_acc: float = Field(description="Top-1 of this model among its output classes on the validation images "
                                       "of those classes, from the pool's cached logits.")
    val_acc_by_format: dict[str, float | None] = Field(
        description="The same accuracy in every weight format; null where the pool refuses the format.")
    val_acc_by_class: dict[str, float] = Field(
        description="Per label, in output order: the share of that class's validation images the model "
                    "ranks first; their mean is val_acc.")
    reject: RejectOut = Field(description="The \"none of these\" rule of this model, fitted on validation.")
    reject_output: bool = Field(description="Whether the file computes the rule as its output `accepted`.")
    mask: MaskOut | None = Field(description="For a poe model: the mask baseline on the same query; null for mask.")
    input: InputSpec
    created_at: datetime
    download_url: str


class PlanPoint(BaseModel):
    widths: dict[str, float] = Field(description="Expert width (ks) per task, in task order.")
    params: int
    bytes: int = Field(description="Of the ONNX file in the asked weight format, without softmax or reject output.")
    macs: int
    val_acc: float
    id: str = Field(description="The model id of this point with the asked options.")
    download_url: str


class PlanOut(BaseModel):
    pool_version: int
    pool_id: str
    tasks: list[str]
    labels: list[str]
    size: Literal["params", "bytes", "macs"] = Field(description="The size measure of the front.")
    points: list[PlanPoint] = Field(description="The accuracy-vs-size Pareto front, by increasing size (within "
                                                "the budget, if one is given).")
    unavailable: str | None = Field(description="Why the pool offers no choice of widths (then one point).")


class TaskOut(BaseModel):
    name: str
    classes: list[str]
    params: int = Field(description="Parameters of the task's expert head.")
    flops: int
    onnx_bytes: int = Field(description="Bytes the expert adds to an assembled model.")
    val_acc: float = Field(description="The expert's task-specific validation accuracy.")
    val_acc_by_format: dict[str, float | None] = Field(
        description="The same accuracy in every weight format; null where the pool refuses the format.")


class FormatOut(BaseModel):
    available: bool
    reason: str | None = Field(description="Why the pool refuses this format.")
    val_acc_drop: dict | None = Field(None, description="Measured drop against fp32 over composite tasks.")


class TaskList(BaseModel):
    pool_version: int
    pool_id: str
    input: InputSpec = Field(description="The input of every model of this pool, and how a photo becomes it.")
    library: dict = Field(description="The shared library: params, flops, onnx_bytes.")
    formats: dict[str, FormatOut] = Field(description="The weight formats this pool offers.")
    tasks: list[TaskOut]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    database: bool
    pool_version: int | None = None
    workers: int | None = Field(None, description="Workers alive (polling the job queue).")
    reasons: list[str] = []


# --- admin ------------------------------------------------------------------


# A path the file system can take: no NUL byte.
DataPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
FILE_SOURCES = tuple(s for s in SOURCES if s not in ("synthetic", "image-folder"))


class DataOptions(Strict):
    val_per_class: int = Field(50, ge=1, le=10000)
    seed: int = 0

    def load_options(self) -> dict:
        """The size options of poe_core.data.load_splits for this source."""
        return {}


class SyntheticData(DataOptions):
    source: Literal["synthetic"]
    path: DataPath | None = Field(None, description="Ignored: the toy set is generated.")
    hierarchy: DataPath | None = Field(None, description="Ignored.")


class FileData(DataOptions):
    source: Literal[FILE_SOURCES]
    path: DataPath = Field(description="Data directory under one of POE_DATA_ROOTS.")
    hierarchy: DataPath | None = Field(None, description="Ignored by this source.")


DEFAULT_IMAGE_SIZE = 32  # poe extract's --image-size


class ImageFolderData(DataOptions):
    source: Literal["image-folder"]
    path: DataPath = Field(description="Data directory (train/<class>/*) under one of POE_DATA_ROOTS.")
    hierarchy: DataPath = Field(description="Task -> class names JSON, under one of POE_DATA_ROOTS.")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="The model input's side in pixels: photos are center-cropped to it "
                                         "(poe extract --image-size). Default: 32 for an extraction, the active "
                                         "pool's for a custom task.")
    resize: int | None = Field(
        None, ge=8, le=4096, description="Resize each photo's shorter side to this before cropping, at least "
                                         "image_size (poe extract --resize). Default: image_size for an "
                                         "extraction, the active pool's for a custom task.")

    @model_validator(mode="after")
    def _crop_within_resize(self) -> ImageFolderData:
        if self.resize is not None and self.image_size is not None and self.resize < self.image_size:
            raise ValueError(f"resize {self.resize} is smaller than the image size {self.image_size}: "
                             "the crop must fit in the resized photo")
        return self

    def load_options(self) -> dict:
        return {"size": self.image_size or DEFAULT_IMAGE_SIZE, "resize": self.resize}


# Each source with the fields it needs, so what the schema allows is what is accepted.
DataSource = Annotated[SyntheticData | FileData | ImageFolderData, Field(discriminator="source")]


class ExtractionRequest(ExtractionOptions):
    """What to train (every field of poe_core.recipe.ExtractionOptions, with its defaults:
    the same as `poe extract`'s), on which data, and what to do with the result. The
    oracle's `file` and `classes` lie under one of POE_DATA_ROOTS, like the data."""

    data: DataSource
    reuse: Literal["none", "oracle", "library"] = Field(
        "none", description="none: train everything; oracle: reuse the active pool's oracle; "
                            "library: reuse its oracle and library, train experts only.")
    activate: bool = Field(True, description="Activate the new pool version when the job succeeds.")


class TaskRequest(Strict):
    """A custom primitive task: one expert for `classes`, trained by conditional KD from
    the active pool's kept oracle on its frozen library, added to a new pool version.
    Training options left out take the values the pool's own experts were trained with."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="The new primitive task's name; not one of the pool's.")
    classes: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=10000, json_schema_extra={"uniqueItems": True},
        description="Class names of the pool's data set, in the order the expert outputs them.")
    data: DataSource | None = Field(None, description="The data set the active pool was built on; default: "
                                                      "the data of the job that built it.")
    epochs: int | None = Field(None, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, le=10)
    batch_size: int | None = Field(None, ge=1, le=4096)
    bank_views: int = Field(COLD_VIEWS, ge=0, le=64, description="Views of a logit bank filled for this task, "
                            "when no bank of the pool's oracle is found to reuse; 0 runs the oracle on every batch.")
    bank_others_per_class: int | None = Field(
        COLD_OTHERS_PER_CLASS, ge=0, le=100000,
        description="Training images of each class outside the task that a bank filled for it covers, besides all "
                    "of the task's (null: every image). The expert trains on those images for as many steps as "
                    "its epochs over all of them. A bank found to reuse covers every image.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    activate: bool = Field(True, description="Activate the new pool version when the job succeeds.")


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobOut(BaseModel):
    id: int
    kind: str
    status: JobStatus
    progress: float = Field(description="Percent done, 0..100.")
    phase: str | None
    attempts: int
    worker: str | None
    error: str | None
    cancel_requested: bool
    pool_version: int | None = Field(description="The pool version the job produced.")
    request: dict
    log: list[str] = Field(description="Recent log lines, oldest first.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class PoolOut(BaseModel):
    version: int
    pool_id: str
    active: bool
    source: str
    job_id: int | None
    created_at: datetime
    tasks: list[str]
    dataset: dict
    reusable: list[str] = Field(description="Phases a new extraction can reuse from this pool.")
    requests: dict[str, int] = Field(description="Served queries per primitive task (a query counts for "
                                                 "each of its tasks).")


class Error(BaseModel):
    detail: str
