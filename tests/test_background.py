"""hpa/experiments/background.py: host copies and the writer thread."""

from __future__ import annotations

import pytest
import torch


def test_host_copy_is_a_snapshot_and_the_writer_reports_failures():
    from hpa.experiments.background import BackgroundWriter, host_copy

    weight = torch.ones(3)
    (copied,), ready = host_copy((weight,))
    weight.add_(1)  # training goes on in place
    ready()
    assert torch.equal(copied, torch.ones(3))
    writer = BackgroundWriter()
    done = []
    writer.submit(done.append, 1)

    def fail():
        raise OSError("disk full")

    writer.submit(fail)
    assert done == [1]
    with pytest.raises(OSError, match="disk full"):
        writer.close()
