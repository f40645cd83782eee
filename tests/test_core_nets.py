import pytest
import torch

from poe_core.nets import BranchedModel, ExpertHead, Library, count_flops, count_params, wrn


@pytest.mark.parametrize(
    ("depth", "kc", "ks", "millions", "gflops"),
    [(40, 4, 4, 8.97, 1.30), (16, 1, 1, 0.18, 0.027)],
)
def test_paper_parameter_and_flop_counts(depth, kc, ks, millions, gflops):
    model = wrn(depth, kc, ks, 100)
    assert round(count_params(model) / 1e6, 2) == millions
    assert count_flops(model, (3, 32, 32)) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_poe_sizes_match_the_paper():
    library = Library(16, 1)
    experts = [ExpertHead(16, library.out_channels, 0.25, 5) for _ in range(5)]
    one = count_params(library) + count_params(experts[0])
    five = count_params(BranchedModel(library, experts))
    assert round(one / 1e6, 2) == 0.06
    assert round(five / 1e6, 2) == 0.10
    assert round(count_flops(BranchedModel(library, experts), (3, 32, 32)) / 1e9, 2) == 0.02


def test_branched_model_concatenates_expert_logits_in_order():
    library = Library(10, 0.5)
    experts = [ExpertHead(10, library.out_channels, 0.25, n) for n in (2, 3)]
    model = BranchedModel(library, experts).eval()
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    assert out.shape == (4, 5)
    features = library(x)
    torch.testing.assert_close(out[:, 2:], experts[1](features))


def test_library_halves_resolution_and_head_pools():
    library = Library(16, 1)
    assert library(torch.zeros(2, 3, 32, 32)).shape == (2, 32, 16, 16)


def test_bad_depth_is_rejected():
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn(15, 1, 1, 10)
