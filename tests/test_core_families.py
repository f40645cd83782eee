"""Architecture families beyond the 32x32 WRN: WRN with a strided conv1, MobileNetV2."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from photo_folders import write_tiny_imagenet
from PIL import Image
from typer.testing import CliRunner

from poe_core import cli
from poe_core.assemble import Assembler
from poe_core.bank import ViewRecipe
from poe_core.build import build_pool_from_work, normalised
from poe_core.data import crop_pad, input_options, load_image_folder, load_photo, make_synthetic
from poe_core.extract import run_phase
from poe_core.nets import (
    MobileNetV2Spec,
    Network,
    WRNSpec,
    count_params,
    expert_head,
    spec_from_dict,
)
from poe_core.pool import load_pool
from poe_core.recipe import Architecture, ExtractionOptions, ExtractionPlan, TrainConfig
from poe_core.reject import score
from poe_core.taxonomy import wordnet_taxonomy


def run_onnx(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})


def metadata(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


def test_wrn_stride_2_on_64x64_gives_the_32x32_features():
    torch.manual_seed(0)
    strided = WRNSpec(10, 0.5, 0.25, stride=2).library()
    plain = WRNSpec(10, 0.5, 0.25).library()
    plain.load_state_dict(strided.state_dict())
    assert strided(torch.zeros(2, 3, 64, 64)).shape == plain(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 16, 16)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(strided.conv1(x), plain.conv1(x)[..., ::2, ::2])


def test_wrn_records_as_before_unless_strided():
    assert WRNSpec(16, 1, 0.25).to_dict() == {"depth": 16, "kc": 1, "ks": 0.25}
    assert WRNSpec(16, 1, 0.25, 2).to_dict() == {"depth": 16, "kc": 1, "ks": 0.25, "stride": 2}
    for spec in (WRNSpec(16, 1, 0.25), WRNSpec(16, 1, 0.25, 2), MobileNetV2Spec(3, 0.5, 0.25)):
        assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="family"):
        spec_from_dict({"family": "vit", "kc": 1, "ks": 1})


@pytest.mark.parametrize("split", [1, 3, 4, 6])
def test_mobilenet_v2_library_and_head_compose_to_the_whole_network(split):
    spec = MobileNetV2Spec(split, 0.25, 0.25)
    net = Network(spec, 7).eval()
    x = torch.rand(2, 3, 128, 128)
    features = net.library(x)
    assert features.shape[1] == net.library.out_channels
    assert net(x).shape == (2, 7)
    torch.testing.assert_close(net(x), net.head(features))
    # torchvision's blocks: a library of k stages holds their InvertedResidual blocks.
    blocks = sum(n for _, _, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                      (6, 96, 3, 1), (6, 160, 3, 2))[:split])
    assert len(net.library.stages) == blocks


def test_mobilenet_v2_head_width_shrinks_the_expert():
    library = MobileNetV2Spec(3, 1.0, 1.0).library()
    small = expert_head(MobileNetV2Spec(3, 1.0, 0.25), library.out_channels, 10, seed=0)
    full = expert_head(MobileNetV2Spec(3, 1.0, 1.0), library.out_channels, 10, seed=0)
    assert count_params(small) * 8 < count_params(full)
    assert small.last.out_channels == 320 and full.last.out_channels == 1280
    # The seed alone decides the initial weights.
    again = expert_head(MobileNetV2Spec(3, 1.0, 0.25), library.out_channels, 10, seed=0)
    for a, b in zip(small.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_mobilenet_v2_split_is_checked():
    with pytest.raises(ValueError, match="split"):
        MobileNetV2Spec(7, 1, 1)


@pytest.mark.parametrize("text", ["16,4,4", "16,1,0.25,2", "mobilenet_v2,3,0.5,0.25", "10,0.1,0.3"])
def test_architecture_text_reads_back(text):
    arch = Architecture.parse(text)
    assert Architecture.parse(arch.text()) == arch
    assert Architecture.of(arch.spec()) == arch


@pytest.mark.parametrize("text", ["16,4", "mobilenet_v2,3,1", "mobilenet_v2,9,1,1", "15,1,1", "16,1,1,2,3"])
def test_bad_architecture_text_is_refused(text):
    with pytest.raises(ValueError):
        Architecture.parse(text)


def test_experts_must_continue_the_library():
    mobile = {"family": "mobilenet_v2", "split": 3, "kc": 1, "ks": 0.25}
    ok = ExtractionOptions(library={"arch": mobile | {"ks": 1}}, experts={"arch": mobile})
    assert ok.plan().expert_spec == MobileNetV2Spec(3, 1, 0.25)
    with pytest.raises(ValueError, match="continue"):
        ExtractionOptions(library={"arch": mobile}, experts={"arch": mobile | {"split": 4}})
    with pytest.raises(ValueError, match="continue"):
        ExtractionOptions(library={"arch": mobile})  # the default experts are WRNs
    with pytest.raises(ValueError, match="depth"):
        ExtractionOptions(library={"arch": {"family": "wrn", "kc": 1, "ks": 1}})


@pytest.fixture(scope="module")
def mobilenet_pool(tmp_path_factory):
    """A MobileNetV2 pool on synthetic 128x128 images, trained through the phases (one
    epoch each, tiny widths: structure, not accuracy)."""
    splits = make_synthetic(size=128, per_class=6, val_per_class=2, test_per_class=1)
    cfg = dict(epochs=1, batch_size=16, precision="fp32", lr=0.05)
    plan = ExtractionPlan(oracle_spec=MobileNetV2Spec(3, 0.25, 0.25), library_spec=MobileNetV2Spec(3, 0.25, 0.25),
                          expert_spec=MobileNetV2Spec(3, 0.25, 0.1), oracle_cfg=TrainConfig(**cfg),
                          library_cfg=TrainConfig(**cfg), expert_cfg=TrainConfig(**cfg), bank=ViewRecipe(2))
    work = tmp_path_factory.mktemp("mobilenet") / "work"
    for phase in ("oracle", "library", "experts"):
        run_phase(phase, work, splits, plan)
    return build_pool_from_work(work, work.parent / "pool", splits), splits


def test_mobilenet_v2_pool_records_its_family_and_split(mobilenet_pool):
    mobilenet_pool, _ = mobilenet_pool
    arch = mobilenet_pool.spec.architecture
    assert arch.family == "mobilenet_v2"
    assert arch.library == {"family": "mobilenet_v2", "split": 3, "kc": 0.25, "ks": 0.25}
    assert arch.expert == {"family": "mobilenet_v2", "split": 3, "kc": 0.25, "ks": 0.1}
    assert mobilenet_pool.image_shape == [3, 128, 128]
    oracle = mobilenet_pool.spec.oracle
    assert oracle.format == "poe" and oracle.architecture["family"] == "mobilenet_v2"
    assert mobilenet_pool.spec.library.flops > 0 and mobilenet_pool.part("task0").params > 0


@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8"])
def test_mobilenet_v2_assembled_model_equals_pytorch(mobilenet_pool, weights):
    pool, splits = mobilenet_pool
    model = Assembler(pool).assemble(["task2", "task0"], weights=weights)
    x = normalised(splits.val, pool.mean, pool.std)
    (out,) = run_onnx(model.data, x)
    if weights == "fp32":
        with torch.no_grad():
            expected = pool.branched_model(["task2", "task0"])(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    # Every format: the model computes the cached validation logits its figures come from.
    np.testing.assert_allclose(out, pool.query_logits(pool.query(["task2", "task0"]), weights).numpy(),
                               atol=1e-4 if weights != "int8" else 1e-3, rtol=0)
    assert json.loads(metadata(model.data)["poe.input"])["shape"] == ["batch", 3, 128, 128]


def test_mobilenet_v2_pool_answers_class_queries_with_a_reject_output(mobilenet_pool):
    pool, splits = mobilenet_pool
    q = pool.query(["task1"], ["class0_1"])
    rule = pool.reject_rule(q)
    model = Assembler(pool).assemble(q, reject=rule, reject_output=True)
    logits, accepted = run_onnx(model.data, normalised(splits.val, pool.mean, pool.std))
    np.testing.assert_allclose(logits, pool.query_logits(q).numpy(), atol=1e-4, rtol=0)
    assert model.labels == ("class1_0", "class1_1", "class0_1")
    np.testing.assert_array_equal(accepted, score(logits, rule.score) >= np.float32(rule.threshold))


def test_photos_are_resized_by_their_shorter_side_and_center_cropped(tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)  # 60 wide, 40 high
    Image.fromarray(photo).save(tmp_path / "p.png")
    expected = np.asarray(Image.fromarray(photo).resize((30, 20), Image.BILINEAR).crop((5, 0, 25, 20)))
    np.testing.assert_array_equal(load_photo(tmp_path / "p.png", 20, 20), expected.transpose(2, 0, 1))
    assert load_photo(tmp_path / "p.png", 16, 24).shape == (3, 16, 16)


def test_crop_padding_follows_the_input_size():
    assert [crop_pad(h) for h in (16, 32, 64, 128)] == [4, 4, 8, 16]
    # 32x32 banks keep their recipe, hence their key.
    assert ViewRecipe().at_size(32) == ViewRecipe() and ViewRecipe().at_size(64).pad == 8


def test_wordnet_groups_build_the_primitive_tasks(tmp_path):
    groups = write_tiny_imagenet(tmp_path / "tin", per_class=3, test_per_class=1)
    splits = load_image_folder(tmp_path / "tin", groups, size=64, resize=72, val_per_class=1)
    taxonomy = splits.taxonomy
    # Classes in wnid order, named by their first lemma; tasks reached through wordnet.is_a.txt.
    assert taxonomy.classes == ("brambling", "goldfinch", "Chihuahua", "golden_retriever", "tabby", "lion")
    assert {t: taxonomy.class_names(t) for t in taxonomy.tasks} == {
        "canine": ["Chihuahua", "golden_retriever"], "feline": ["tabby", "lion"], "bird": ["brambling", "goldfinch"]}
    assert splits.image_shape == (3, 64, 64) and splits.preprocess == {"resize_shorter_side": 72, "center_crop": 64}
    # The test split is Tiny-ImageNet's annotated val/ folder (the synthetic classes in order).
    assert splits.test.y.tolist() == [2, 3, 4, 5, 0, 1]


def test_wordnet_taxonomy_names_shared_lemmas_apart_and_refuses_empty_groups():
    words = {"n00000001": "crane, bird", "n00000002": "crane, machine"}
    taxonomy, wnids = wordnet_taxonomy({"birds": ["n00000001"], "both": ["n00000009"]},
                                       ["n00000001", "n00000002"], words, {"n00000001": ["n00000009"],
                                                                           "n00000002": ["n00000009"]})
    assert taxonomy.classes == ("crane_n00000001", "crane_n00000002") and wnids == ["n00000001", "n00000002"]
    assert taxonomy.tasks == {"birds": (0,), "both": (0, 1)}
    with pytest.raises(ValueError, match="'fish'.*reach no class folder"):
        wordnet_taxonomy({"fish": ["n00000003"]}, ["n00000001"], words, {})


@pytest.fixture(scope="module")
def photo_pool(tmp_path_factory):
    """A WRN pool with stride 2 on 64x64 crops of 80x72 photos in the Tiny-ImageNet layout,
    extracted by `poe extract` as the README's worked example does (one epoch each)."""
    root = tmp_path_factory.mktemp("photos")
    groups = write_tiny_imagenet(root / "tiny-imagenet")
    args = ["extract", "--work", str(root / "work"), "--out", str(root / "pool"), "--data", "image-folder",
            "--data-path", str(root / "tiny-imagenet"), "--hierarchy", str(groups), "--image-size", "64",
            "--resize", "72", "--val-per-class", "2", "--oracle-arch", "10,1,1,2", "--library-arch", "10,0.5,0.5,2",
            "--expert-arch", "10,0.5,0.25", "--oracle-epochs", "1", "--library-epochs", "1", "--expert-epochs", "1",
            "--bank-views", "2", "--batch-size", "16", "--precision", "fp32", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    pool = load_pool(root / "pool")
    return pool, load_image_folder(root / "tiny-imagenet", groups, **input_options(pool.image_shape,
                                                                                pool.spec.dataset.preprocess),
                                   val_per_class=2)


def test_photo_pool_records_its_input_and_architecture(photo_pool):
    pool, splits = photo_pool
    assert pool.image_shape == [3, 64, 64]
    assert pool.spec.dataset.preprocess == {"resize_shorter_side": 72, "center_crop": 64}
    assert pool.spec.architecture.library == {"depth": 10, "kc": 0.5, "ks": 0.5, "stride": 2}
    assert pool.tasks == ["canine", "feline", "bird"]
    assert pool.spec.training["library"]["bank"]["pad"] == 8
    model = Assembler(pool).assemble(["bird"])
    assert json.loads(metadata(model.data)["poe.input"]) == {
        "name": "input", "layout": "NCHW", "color": "RGB", "shape": ["batch", 3, 64, 64],
        "scale": "pixel / 255, then (x - mean) / std", "resize_shorter_side": 72, "center_crop": 64}


def test_photo_pool_models_equal_pytorch_and_their_reject_rule(photo_pool):
    pool, splits = photo_pool
    x = normalised(splits.val, pool.mean, pool.std)
    (out,) = run_onnx(Assembler(pool).assemble(["feline", "canine"]).data, x)
    with torch.no_grad():
        expected = pool.branched_model(["feline", "canine"])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    q = pool.query(["bird"], ["lion"])
    rule = pool.reject_rule(q)
    logits, accepted = run_onnx(Assembler(pool).assemble(q, reject=rule, reject_output=True).data, x)
    np.testing.assert_allclose(logits, pool.query_logits(q).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(accepted, score(logits, rule.score) >= np.float32(rule.threshold))
    assert accepted[np.isin(splits.val.y.numpy(), q.classes)].mean() >= rule.accept_rate_in_task - 1e-6
