"""ldm.accel.malloc: the allocator setting applies once on glibc and can be turned off."""

import ctypes.util
import platform

import pytest

from ldm.accel import malloc as runtime


def test_tune_cpu_allocator_once_and_opt_out(monkeypatch):
    monkeypatch.setattr(runtime, "_done", False)
    monkeypatch.setenv("LDM_NO_MALLOC_TUNING", "1")
    assert runtime.tune_cpu_allocator() is False
    monkeypatch.delenv("LDM_NO_MALLOC_TUNING")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert ctypes.util.find_library("c")
    assert runtime.tune_cpu_allocator() is True
    assert runtime.tune_cpu_allocator() is False  # already applied
