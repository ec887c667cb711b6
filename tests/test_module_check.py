"""The per-call module check (`runtime/stamps.py`): its content checksum is only trusted over the storages it was
taken from, and on CUDA it replays as one graph once a stamp has lived a few calls, seeing every write an eager check
sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_trt.runtime import content_check, stamps
from monai_trt.runtime.stamps import IN_PLACE, Stamp
from tests.conftest import requires_cuda

TENSOR_CONTENTS = "tensor contents (a write that bypassed the version counter)"


def _net() -> nn.Module:
    torch.manual_seed(0)
    # a small conv (checked byte for byte) and a large linear weight (checked by statistics)
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.Flatten(), nn.Linear(300, 300)).eval()


def test_a_swapped_storage_is_reported_before_any_checksum_is_taken(monkeypatch):
    net = _net()
    stamp = Stamp(net)
    launched = []
    monkeypatch.setattr(stamp._content, "launch", lambda: launched.append(1) or [])
    net[0].weight.data = net[0].weight.data.clone()  # same values, new storage: the checksum would not see it
    assert stamp.changed() == IN_PLACE
    assert not launched, "a checksum over the old storages must not be taken, let alone trusted"


def test_structure_changes_are_still_reported_as_such():
    net = _net()
    stamp = Stamp(net)
    net[0].weight = nn.Parameter(net[0].weight.detach().clone())
    assert stamp.changed() == "structure or attributes"


def test_a_deferred_walk_reports_structure_changes_when_read():
    """Served calls walk the module tree after the engine is enqueued: the change shows when the check is read."""
    net = _net()
    stamp = Stamp(net)
    net[0].weight = nn.Parameter(net[0].weight.detach() * 2)
    deferred: list = []
    assert stamp.changed(deferred, walk_later=True) is None  # nothing walked yet
    assert stamps.content_change(deferred)[1] == "structure or attributes"
    assert stamp.changed([]) == "structure or attributes"  # without walk_later the walk comes first


def test_a_tensor_moved_to_another_table_is_seen():
    """The walk compares one flat list of values by identity, and the size of every table: a tensor moved from the
    parameters to the buffers leaves the flat list as it was."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.ones(3))
    stamp = Stamp(holder)
    holder._buffers["weight"] = holder._parameters.pop("weight")
    assert stamp.changed() == "structure or attributes"


def test_equal_values_in_new_objects_are_not_a_change():
    """torch.export copies tuple attributes: equal values in new objects keep the stamp (compared by identity after)."""
    net = _net()
    stamp = Stamp(net)
    net[0].stride = tuple(list(net[0].stride))  # a new tuple object, equal to the old one
    assert stamp.changed() is None
    net[0].stride = (2, 2, 2)
    assert stamp.changed() == "structure or attributes"


def test_cpu_checks_never_capture(monkeypatch):
    net = _net()
    stamp = Stamp(net)
    monkeypatch.setattr(content_check._GraphedCheck, "capture", lambda *a: pytest.fail("no graphs on CPU"))
    for _ in range(content_check.GRAPH_AFTER + 2):
        assert stamp.changed() is None
    with torch.no_grad():
        net[2].weight.data[3, 7] += 1.0
    assert stamp.changed() == TENSOR_CONTENTS


@requires_cuda
@pytest.mark.parametrize("layer", [0, 2], ids=["small_exact", "large_statistics"])
def test_graphed_checks_on_cuda_see_writes_behind_the_version_counter(layer):
    net = _net().cuda()
    stamp = Stamp(net)
    for _ in range(content_check.GRAPH_AFTER + 3):
        assert stamp.changed() is None
    graphs = stamp._content._graphs
    assert graphs and all(g is not None for g in graphs.values()), "the check should replay as a CUDA graph by now"
    with torch.no_grad():
        net[layer].weight.data.view(-1)[5] += 0.5  # no version bump: only the checksum can see this
    assert stamp.changed() == TENSOR_CONTENTS
    deferred: list = []
    assert stamp.changed(deferred) is None  # deferred: the answer comes with the read
    assert stamps.content_change(deferred)[1] == TENSOR_CONTENTS


@requires_cuda
def test_graphed_checks_follow_many_calls_from_two_threads():
    import threading

    net = _net().cuda()
    stamp = Stamp(net)
    for _ in range(content_check.GRAPH_AFTER + 1):
        stamp.changed()
    answers: list = []

    def calls() -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            answers.extend(stamp.changed() for _ in range(50))

    workers = [threading.Thread(target=calls) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert answers == [None] * 100
