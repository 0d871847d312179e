"""The benchmark table's "Verified" column can say FAILED: ``benchmarks._verify`` on perturbed values.

A checker that always answered "exact" would make every row of the README table look verified;
these tests feed it exact, perturbed, missing, misshaped and NaN values and check each verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package lives at the root

from benchmarks._verify import OUTPUT, check, forward_reference, gradient_reference, loss_of  # noqa: E402


@pytest.fixture
def expected() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}


def test_identical_values_are_exact(expected):
    assert check({k: v.clone() for k, v in expected.items()}, expected) == "exact"


def test_a_one_ulp_perturbation_fails_without_tolerance(expected):
    got = {k: v.clone() for k, v in expected.items()}
    got["b"][2] = torch.nextafter(got["b"][2], torch.tensor(float("inf")))
    assert check(got, expected).startswith("FAILED: 'b' max |Δ|")


def test_a_perturbation_of_1e_6_fails_without_tolerance(expected):
    got = {k: v.clone() for k, v in expected.items()}
    got["a"][1, 1] += 1e-6
    assert check(got, expected).startswith("FAILED: 'a' max |Δ| 9.5e-07")  # 1e-6 in float32


def test_within_the_tolerance_is_close_with_the_largest_difference(expected):
    got = {k: v.clone() for k, v in expected.items()}
    got["a"][0, 0] += 3e-6
    assert check(got, expected, atol=1e-5) == "close (max |Δ| 3e-06)"


def test_beyond_the_tolerance_fails(expected):
    got = {k: v.clone() for k, v in expected.items()}
    got["a"] = got["a"] * 1.01
    assert check(got, expected, rtol=1e-3, atol=1e-6).startswith("FAILED: 'a' max |Δ|")


def test_nan_fails_even_with_a_tolerance(expected):
    got = {k: v.clone() for k, v in expected.items()}
    got["b"][0] = float("nan")
    assert check(got, expected, rtol=1.0, atol=1.0).startswith("FAILED: 'b'")


def test_nothing_captured_fails(expected):
    assert check({}, expected) == "FAILED: captured nothing"
    assert check(None, expected) == "FAILED: captured nothing"


def test_a_missing_key_or_an_empty_list_fails(expected):
    assert check({"a": expected["a"]}, expected) == "FAILED: 'b' not captured"
    assert check({"a": expected["a"], "b": []}, expected) == "FAILED: 'b' not captured"


def test_a_wrong_shape_fails(expected):
    got = {"a": expected["a"].t(), "b": expected["b"]}
    assert check(got, expected) == "FAILED: 'a' shape (3, 2) != (2, 3)"


def test_a_list_is_checked_by_its_last_element(expected):
    stale = expected["a"] + 1
    assert check({"a": [stale, expected["a"]], "b": expected["b"]}, expected) == "exact"
    assert check({"a": [expected["a"], stale], "b": expected["b"]}, expected).startswith("FAILED: 'a'")


def test_only_the_named_keys_are_required(expected):
    assert check({"a": expected["a"]}, expected, keys=["a"]) == "exact"


def test_a_lower_precision_capture_is_compared_in_its_dtype(expected):
    got = {k: v.to(torch.bfloat16) for k, v in expected.items()}
    assert check(got, expected) == "exact"  # the reference is cast to the captured dtype
    got["a"][0, 0] += 1
    assert check(got, expected).startswith("FAILED: 'a'")


class _ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)).mean(dim=(2, 3))


def test_forward_reference_clones_before_an_in_place_op():
    # a hook returning its clone would replace the output and let the ReLU rectify the clone
    torch.manual_seed(0)
    model, x = _ConvReLU(), torch.randn(2, 3, 8, 8)
    ref = forward_reference(model, ["conv"], x)
    assert torch.equal(ref["conv"], model.conv(x)) and (ref["conv"] < 0).any()
    assert torch.equal(ref[OUTPUT], model(x))


def test_gradient_reference_equals_autograd_grad():
    # the gradient at the conv output, not at the ReLU output the in-place op turns it into
    torch.manual_seed(0)
    model, x = _ConvReLU(), torch.randn(2, 3, 8, 8)
    ref = gradient_reference(model, ["conv"], x)
    h = model.conv(x)
    (expected,) = torch.autograd.grad(loss_of(torch.relu(h).mean(dim=(2, 3))), h)
    torch.testing.assert_close(ref["conv"], expected, rtol=0, atol=0)
    assert (expected == 0).any() and (expected != 0).any()
