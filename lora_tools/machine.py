"""Machine tuning that is no part of the LoRA story: glibc's allocator policy for CPU runs."""


def keep_host_memory():
    """CPU training on Linux: by default glibc hands large freed blocks back to the OS and maps them
    again at the next step (page faults every step), and the VAE's big blocks during caching change
    that policy for the rest of the run. Keeping freed host memory for reuse makes every step run at
    the same speed as a bare UNet step; the process keeps its peak memory, which it needs anyway."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
    big = 2**30  # 1 GiB: larger than any single activation block we free and reallocate
    return bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))
