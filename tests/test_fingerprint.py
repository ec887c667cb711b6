"""Pieces of the architecture fingerprint (`runtime/fingerprint.py`) that a warm process pays for on its first call."""

from __future__ import annotations

import importlib.metadata

import torch
from torch import nn

from monai_trt.runtime.fingerprint import _top_level, describe_module


def test_top_level_names_from_record_text_match_the_distributions_files(tmp_path):
    """Without top_level.txt, the names come from RECORD read as text (not one path object per file): the same set
    `Distribution.files` gives, quoted paths and "./" parts included."""
    info = tmp_path / "demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (info / "RECORD").write_text(
        "demo/__init__.py,sha256=x,1\n"
        "single.py,,\n"
        '"odd,name/x.py",,\n'
        "./dotted/y.py,,\n"
        "demo-1.0.dist-info/RECORD,,\n"
        "../../bin/tool,,\n")
    distribution = importlib.metadata.PathDistribution(info)
    from_files = {str(f).split("/", 1)[0].removesuffix(".py") for f in distribution.files}
    assert _top_level(distribution) == from_files
    assert {"demo", "single", "odd,name", "dotted", ".."} <= _top_level(distribution)


def test_only_persistent_buffers_are_listed_as_such():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3))
    net[1].register_buffer("scratch", torch.zeros(3), persistent=False)
    persistent = describe_module(net)["persistent_buffers"]
    assert persistent == ["0.num_batches_tracked", "0.running_mean", "0.running_var"]
