"""The one label policy for sampling (flowdiff.labels)."""

import torch

from flowdiff.labels import as_labels, grid_rows, sampling_labels


def test_sampling_labels_policy():
    assert sampling_labels(5, 0) is None and sampling_labels(5, 0, label=3) is None  # unconditional: no labels
    assert sampling_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]  # balanced cycle
    assert sampling_labels(4, 10, label=3).tolist() == [3, 3, 3, 3]  # one class, over the reference
    ref = torch.tensor([4, 4, 1])
    assert sampling_labels(7, 10, reference=ref).tolist() == [4, 4, 1, 4, 4, 1, 4]  # the held-out frequencies
    assert sampling_labels(2, 10, reference=ref).tolist() == [4, 4]


def test_grid_rows_and_as_labels():
    assert grid_rows(0, 4) is None
    assert grid_rows(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert as_labels(3, None) is None
    assert as_labels(3, 2).tolist() == [2, 2, 2]
    assert as_labels(3, torch.tensor(1)).tolist() == [1, 1, 1]
    y = torch.tensor([0, 2, 1])
    assert as_labels(3, y) is y
