"""Update inversion: one record's update gives the record away; the fleet's aggregate does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iiotfl.configs import compose
from iiotfl.privacy.reconstruction import closeness, invert, sgd_update
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import combine


@pytest.fixture(scope="module")
def fleet():
    torch.set_num_threads(1)
    task = get_task(compose()["task"], 0)
    data = [task.gateway_data(i)[0] for i in range(4)]
    norm = task.normaliser(combine([task.feature_sums(d) for d in data]))
    return task, [task.windows(d, norm) for d in data]


def test_single_record_update_is_inverted_closely(fleet):
    task, windows = fleet
    x, y = windows[0]
    model = task.build_model()
    update = sgd_update(model, x[100:101], task.target(y[100:101]).astype(np.float32), lr=0.01)
    x_hat, y_hat = invert(model, update, 0.01, x.shape[1:], steps=600)
    close = closeness(x[100], x_hat)
    assert close["relative_error"] < 0.3 and close["correlation"] > 0.95
    assert y_hat == pytest.approx(float(task.target(y[100])), abs=0.01)  # the label too (iDLG)


def test_fleet_aggregate_gives_no_record_away(fleet):
    task, windows = fleet
    model = task.build_model()
    updates = [sgd_update(model, x[:64], task.target(y[:64]).astype(np.float32), lr=0.01) for x, y in windows]
    aggregate = [sum(u[j] for u in updates) / len(updates) for j in range(len(updates[0]))]
    x_hat, _ = invert(model, aggregate, 0.01, windows[0][0].shape[1:], steps=600)
    errors = [closeness(w, x_hat)["relative_error"] for x, _ in windows for w in x[:64]]
    assert min(errors) > 0.5  # not one of the 256 windows behind the aggregate is recovered
