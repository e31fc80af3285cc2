"""Machine details that are no part of the LoRA story: glibc's allocator policy for CPU runs, freeing
memory between phases, and reading a CPU run's peak memory phase by phase."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter ids from <malloc.h>
_kept = False  # whether keep_host_memory changed glibc's policy in this process


def _glibc():
    """glibc's C library on Linux, else None (macOS, Windows, musl: their allocators are left alone)."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def keep_host_memory():
    """For the training steps on a CPU: by default glibc hands large freed blocks back to the OS and
    maps them again at the next step (page faults every step), and the VAE's big blocks during caching
    change that policy for the rest of the run. Keeping freed host memory for reuse makes every step run
    at the same speed as a bare UNet step; within the step loop the process needs that memory anyway."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    big = 2**30  # 1 GiB: larger than any single activation block we free and reallocate
    _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, big)) and bool(libc.mallopt(M_TRIM_THRESHOLD, big))
    return _kept


def free_memory():
    """Between phases: diffusers' free_memory (garbage collection, and the GPU's cache back to the
    driver), then, on a glibc CPU run, the heap's free pages back to the OS (malloc_trim) and, after
    keep_host_memory, glibc's usual policy back (blocks over 32 MiB, the ceiling of its own adaptive
    threshold, mapped and unmapped). So what one phase freed (the encoders after caching, the steps'
    activations, the trained model after saving) is not counted again in the next phase's peak, and
    rendering, which has no step loop to feed, does not pile up freed blocks picture after picture."""
    global _kept
    from diffusers.training_utils import free_memory as free_gc_and_gpu_cache

    free_gc_and_gpu_cache()
    libc = _glibc()
    if libc is None:
        return
    if _kept:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)  # twice the mmap threshold, as glibc's adaptive rule sets it
        _kept = False
    libc.malloc_trim(0)


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
