"""The budget's allocator reader takes the nested stats, not memory_allocated's sorted copy."""

import torch

from lms.runtime import allocated_bytes_reader


def test_reader_uses_the_nested_stats_binding(monkeypatch):
    calls = []

    def fake_stats(index):
        calls.append(index)
        return {"allocated_bytes": {"all": {"current": 1234 + index}}}

    monkeypatch.setattr(torch._C, "_cuda_memoryStats", fake_stats, raising=False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    read = allocated_bytes_reader(torch.device("cuda", 1))
    assert read() == 1235 and read() == 1235
    assert calls == [1, 1]


def test_reader_falls_back_to_the_public_call(monkeypatch):
    monkeypatch.delattr(torch._C, "_cuda_memoryStats", raising=False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 77)
    assert allocated_bytes_reader(torch.device("cuda", 0))() == 77
