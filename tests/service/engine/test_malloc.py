import platform

import pytest

from service.engine import malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_mmap_threshold_is_pinned_once_on_glibc():
    assert malloc.fix_mmap_threshold() is True
    assert malloc.fix_mmap_threshold() is True  # idempotent
