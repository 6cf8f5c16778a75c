"""The micro-batch layout's sums against a loop over each micro-batch's samples (ragged last micro-batch too)."""

import pytest
import torch

from mbclip.layout import MicroBatchLayout


def _loop_sums(tensor: torch.Tensor, microbatch_size: int, dims) -> torch.Tensor:
    return torch.stack([part.sum(dim=dims) for part in tensor.split(microbatch_size)])


@pytest.mark.parametrize("microbatch_size", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("shape", [(7, 4), (7, 4, 5), (7, 4, 3, 2)])
def test_channel_sums_sum_each_microbatch_over_samples_and_positions(microbatch_size, shape):
    tensor = torch.randn(shape)
    layout = MicroBatchLayout(shape[0], microbatch_size)
    dims = (0,) + tuple(range(2, len(shape)))
    torch.testing.assert_close(layout.channel_sums(tensor), _loop_sums(tensor, microbatch_size, dims))


@pytest.mark.parametrize("microbatch_size", [1, 3, 7])
def test_sum_per_microbatch_sums_each_microbatch_over_its_samples(microbatch_size):
    tensor = torch.randn(7, 3, 2)
    layout = MicroBatchLayout(7, microbatch_size)
    torch.testing.assert_close(layout.sum_per_microbatch(tensor), _loop_sums(tensor, microbatch_size, (0,)))


@pytest.mark.parametrize("batch_size,microbatch_size", [(0, 3), (7, 1), (7, 3), (7, 7), (7, 9), (8, 4)])
def test_microbatch_sizes_are_those_of_the_split(batch_size, microbatch_size):
    layout = MicroBatchLayout(batch_size, microbatch_size)
    expected = [len(part) for part in torch.arange(batch_size).split(microbatch_size) if len(part)]
    assert layout.microbatch_size_list() == expected
    assert layout.microbatch_sizes().tolist() == expected and layout.microbatch_sizes().dtype == torch.float64
