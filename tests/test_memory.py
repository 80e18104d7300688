import platform

from fabric_quant.memory import LARGE_CHECKPOINT, fix_mmap_threshold, mmap_threshold_for, release_freed_memory


def test_mmap_threshold_follows_the_checkpoint_size():
    # LLM scale: memory first (a low threshold); small models: step time first (a low one made MiniLM 1.6x slower)
    assert mmap_threshold_for(LARGE_CHECKPOINT) == mmap_threshold_for(10 * LARGE_CHECKPOINT) == 256 * 1024
    assert mmap_threshold_for(LARGE_CHECKPOINT - 1) == mmap_threshold_for(0) == 4 * 1024 * 1024


def test_allocator_settings_take_effect_on_glibc_and_are_harmless_elsewhere():
    applied = fix_mmap_threshold(mmap_threshold_for(0))
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    release_freed_memory()
