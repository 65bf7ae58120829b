"""Two sibling ``if`` statements of a scripted module get scopes of their own (``If_0``, ``If_1``).

README (TorchScript): "a scope named as the ONNX reader names branches (`If_0/then_branch`,
`If_0/else_branch`, `Loop_0/body`; `If_k` is the k-th `if` holding a layer in its scope"; so convs of two
``if`` statements side by side never share a name or a branch.
"""

from __future__ import annotations

import torch
from torch import nn

import hpa
from test_torchscript_control_flow import scripted_file


class TwoChoices(nn.Module):
    """A front end chosen by the sample rate, then a head chosen by a flag: two ifs in one block."""

    def __init__(self):
        super().__init__()
        self.narrow, self.wide = nn.Conv1d(1, 4, 3), nn.Conv1d(1, 4, 5)
        self.plain, self.deep = nn.Conv1d(4, 2, 3), nn.Conv1d(4, 2, 5)

    def forward(self, x, sr: int, deep: bool):
        if sr == 16000:
            y = self.narrow(x)
        else:
            y = self.wide(x)
        if deep:
            z = self.deep(torch.relu(y))
        else:
            z = self.plain(torch.relu(y))
        return z


def test_sibling_ifs_get_scopes_of_their_own(tmp_path):
    graph = hpa.load(str(scripted_file(tmp_path, TwoChoices(), "two_choices")))
    assert {layer.name: layer.branch for layer in graph} == {
        "If_0/then_branch/narrow": "If_0/then_branch", "If_0/else_branch/wide": "If_0/else_branch",
        "If_1/then_branch/deep": "If_1/then_branch", "If_1/else_branch/plain": "If_1/else_branch"}
    assert graph.source["branches"] == ["If_0/then_branch", "If_0/else_branch", "If_1/then_branch",
                                        "If_1/else_branch"]
    assert set(graph["If_1/then_branch/deep"].predecessors) == {"If_0/then_branch/narrow", "If_0/else_branch/wide"}
