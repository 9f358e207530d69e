"""The cluster e2e's workload: mmaps a block device and writes or verifies a pattern.

    python3 workload.py write|verify DEVICE MIB SEED

write:  mmap the first MIB MiB of DEVICE (MAP_SHARED), fill it with the
        pattern of SEED, msync, print "r3map-e2e: wrote ...", then hold the
        device open until killed (the pod stays attached).
verify: mmap, compare every byte with the pattern, print
        "r3map-e2e: verified ..." or "r3map-e2e: MISMATCH ...", then sleep.
Every 64 KiB block's content depends on SEED and its offset, so a block
read from the wrong place is caught as well as a lost write.
"""

import hashlib
import mmap
import os
import sys
import time

BLOCK = 64 << 10


def block(seed: str, off: int) -> bytes:
    digest = hashlib.sha256(f"{seed}:{off}".encode()).digest()
    return digest * (BLOCK // len(digest))


def main() -> int:
    mode, dev, mib, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    start = time.monotonic()
    fd = os.open(dev, os.O_RDWR)
    size = os.lseek(fd, 0, os.SEEK_END)
    n = min(size, mib << 20)
    m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if mode == "write":
        for off in range(0, n, BLOCK):
            m[off : off + BLOCK] = block(seed, off)
        m.flush()  # msync(MS_SYNC): reaches the device as an NBD FLUSH
        print(f"r3map-e2e: wrote {n} bytes of {size} in {time.monotonic() - start:.3f} s", flush=True)
    elif mode == "verify":
        for off in range(0, n, BLOCK):
            if m[off : off + BLOCK] != block(seed, off):
                print(f"r3map-e2e: MISMATCH at offset {off}", flush=True)
                return 1
        print(f"r3map-e2e: verified {n} bytes in {time.monotonic() - start:.3f} s since start", flush=True)
    else:
        print(f"r3map-e2e: unknown mode {mode}", flush=True)
        return 2
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
