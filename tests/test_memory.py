"""bloodseg.measure: the saved-for-backward byte counter and the peak-RSS readers."""
from __future__ import annotations

import sys

import pytest
import torch

from bloodseg.measure import count_saved_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes


def test_counts_at_least_a_saved_activation_of_known_size():
    w = torch.randn(1000, requires_grad=True)
    x = torch.randn(1000)
    with count_saved_bytes() as saved:
        y = (w * x).sin()            # mul saves x (w needs grad); sin saves its input (1000 floats)
    y.sum().backward()               # the tensors are handed back unchanged: backward still works
    assert saved.nbytes >= 2 * 1000 * 4
    assert torch.allclose(w.grad, x * (w * x).cos())


def test_a_storage_saved_twice_counts_once():
    a = torch.randn(256, 256, requires_grad=True)
    with count_saved_bytes() as once:
        a.sin()                      # sin saves a: 256 KiB
    with count_saved_bytes() as twice:
        a.sin()
        a.cos()                      # cos saves a again: same storage
    with count_saved_bytes() as views:
        a[:128].sin()
        a[128:].sin()                # two halves, one storage
    assert once.nbytes == 256 * 256 * 4
    assert twice.nbytes == once.nbytes
    assert views.nbytes == once.nbytes


def test_distinct_storages_add_up():
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    with count_saved_bytes() as saved:
        a.sin()
        b.sin()
    assert saved.nbytes == (100 + 300) * 4


def test_nothing_is_saved_without_grad():
    w = torch.randn(1000, requires_grad=True)
    with torch.no_grad(), count_saved_bytes() as saved:
        (w * 2).sin()
    assert saved.nbytes == 0
    with count_saved_bytes() as plain:
        (torch.randn(1000) * 2).sin()   # no input needs grad: no graph, nothing saved
    assert plain.nbytes == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_sees_a_large_allocation():
    assert rss_bytes() > 0
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = rss_bytes()
    block = torch.ones(64 * 2 ** 20 // 4)   # 64 MiB, touched
    del block
    assert peak_rss_bytes() - before >= 48 * 2 ** 20
