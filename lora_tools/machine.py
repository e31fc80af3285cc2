"""Machine details that are no part of the LoRA story: glibc's allocator policy for CPU runs, freeing
memory between phases, and reading a CPU run's peak memory phase by phase."""


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


def free_memory():
    """diffusers' free_memory (garbage collection, and the GPU's cache back to the driver), and on a
    glibc CPU run the heap's free pages back to the OS (malloc_trim): between phases, so that memory
    one phase freed (the encoders after caching, the trained model after saving) is not counted again
    in the next phase's peak. keep_host_memory keeps it only within a phase, for the step loop's reuse."""
    import ctypes
    import platform

    from diffusers.training_utils import free_memory as free_gc_and_gpu_cache

    free_gc_and_gpu_cache()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to hand back this way
            pass


def host_memory_peak():
    """This process's resident-set high-water mark in bytes since the previous call. Linux keeps it
    as VmHWM and resets it when 5 is written to /proc/self/clear_refs, which gives each phase of a
    run its own peak; elsewhere (or where that file is closed) it is the peak of the whole process."""
    import platform
    import resource  # Unix only

    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration):
        unit = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
