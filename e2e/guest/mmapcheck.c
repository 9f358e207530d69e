/*
 * Guest helper for the kernel NBD e2e test (built with gcc -static, runs in
 * the initramfs next to busybox).
 *
 * Every byte it writes or checks comes from one deterministic generator,
 * byte(off, seed), where off is the absolute byte offset on the device. The
 * host test (r3map/tests/kernel.rs) implements the same function and checks
 * the backing file against it, so the two must stay identical:
 *
 *   K      = 0x9E3779B97F4A7C15
 *   word   = fmix64((off >> 3) + seed * K)      (murmur3 finalizer, wrapping)
 *   byte   = (word >> ((off & 7) * 8)) & 0xff
 *
 * Hashing the word index (not off mod 256) makes a block written at the
 * wrong offset visible, and the per-run seed makes stale data visible.
 *
 * Usage:
 *   mmapcheck gen    OFF LEN SEED          pattern bytes to stdout (for dd)
 *   mmapcheck mmap   DEV OFF LEN SEED      mmap MAP_SHARED, fill, msync(MS_SYNC), munmap
 *   mmapcheck dwrite DEV OFF LEN SEED      O_DIRECT aligned pwrite()s
 *   mmapcheck fwrite DEV OFF LEN SEED      buffered pwrite()s, then fsync (FLUSH)
 *   mmapcheck check  DEV OFF LEN SEED|zero O_DIRECT read and compare
 *   mmapcheck mcheck DEV OFF LEN SEED|zero mmap read and compare
 *   mmapcheck mloop  DEV OFF PIECE COUNT SEED
 *                    a "pod": maps PIECE*COUNT bytes MAP_SHARED once, then
 *                    for each piece i fills it and msync(MS_SYNC)s it, and
 *                    prints "i SECONDS" (CLOCK_BOOTTIME, like /proc/uptime)
 *                    once the msync returned; "ERR i ..." and exit 1 on an
 *                    error (a SIGBUS from a failed page-in too)
 *   mmapcheck mbench DEV OFF LEN SEED
 *                    timed mmap MAP_SHARED write (copy the pattern in,
 *                    msync(MS_SYNC), munmap), then the device's caches
 *                    dropped (BLKFLSBUF and /proc/sys/vm/drop_caches), then
 *                    a timed mmap read (copy out, munmap) compared with the
 *                    pattern; prints "write_s=S read_s=S" (CLOCK_MONOTONIC).
 *                    The pattern is generated before the clock starts: under
 *                    emulation the generator would cost more than the I/O.
 * OFF and LEN take a k/m suffix (KiB/MiB). Exit 0 on success, 1 on any error
 * or mismatch (with the first differing offset on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096
#define IOSZ (256 * 1024)

static uint64_t fmix64(uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return k;
}

static int zero_mode;

static uint8_t pat(uint64_t off, uint64_t seed)
{
	if (zero_mode)
		return 0;
	uint64_t w = fmix64((off >> 3) + seed * 0x9E3779B97F4A7C15ULL);
	return (uint8_t)(w >> ((off & 7) * 8));
}

static void fill(uint8_t *buf, uint64_t off, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = pat(off + i, seed);
}

static int die(const char *what)
{
	fprintf(stderr, "mmapcheck: %s: %s\n", what, strerror(errno));
	return 1;
}

static uint64_t num(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);
	if (*end == 'k' || *end == 'K')
		v <<= 10;
	else if (*end == 'm' || *end == 'M')
		v <<= 20;
	else if (*end) {
		fprintf(stderr, "mmapcheck: bad number %s\n", s);
		exit(1);
	}
	return v;
}

static void *aligned(size_t len)
{
	void *p;
	if (posix_memalign(&p, ALIGN, len)) {
		fprintf(stderr, "mmapcheck: out of memory\n");
		exit(1);
	}
	return p;
}

static int compare(const uint8_t *got, uint64_t off, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++) {
		uint8_t want = pat(off + i, seed);
		if (got[i] != want) {
			fprintf(stderr, "mmapcheck: mismatch at offset %llu: got %#x want %#x\n",
				(unsigned long long)(off + i), got[i], want);
			return 1;
		}
	}
	return 0;
}

static int cmd_gen(uint64_t off, uint64_t len, uint64_t seed)
{
	uint8_t *buf = aligned(IOSZ);
	while (len) {
		size_t n = len < IOSZ ? len : IOSZ;
		fill(buf, off, n, seed);
		for (size_t done = 0; done < n;) {
			ssize_t w = write(1, buf + done, n - done);
			if (w < 0)
				return die("write stdout");
			done += w;
		}
		off += n;
		len -= n;
	}
	return 0;
}

static int cmd_mmap(const char *dev, uint64_t off, uint64_t len, uint64_t seed, int check)
{
	if (off % ALIGN) {
		fprintf(stderr, "mmapcheck: mmap offset must be page aligned\n");
		return 1;
	}
	int fd = open(dev, check ? O_RDONLY : O_RDWR);
	if (fd < 0)
		return die("open");
	uint8_t *m = mmap(NULL, len, check ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED, fd,
			  (off_t)off);
	if (m == MAP_FAILED)
		return die("mmap");
	int rc = 0;
	if (check) {
		rc = compare(m, off, len, seed);
	} else {
		fill(m, off, len, seed);
		/* MS_SYNC: returns only once the dirty pages reached the device. */
		if (msync(m, len, MS_SYNC))
			return die("msync");
	}
	if (munmap(m, len))
		return die("munmap");
	if (close(fd))
		return die("close");
	return rc;
}

static int cmd_write(const char *dev, uint64_t off, uint64_t len, uint64_t seed, int direct)
{
	if (direct && (off % 512 || len % 512)) {
		fprintf(stderr, "mmapcheck: O_DIRECT needs 512-byte alignment\n");
		return 1;
	}
	int fd = open(dev, O_WRONLY | (direct ? O_DIRECT : 0));
	if (fd < 0)
		return die("open");
	uint8_t *buf = aligned(IOSZ);
	while (len) {
		size_t n = len < IOSZ ? len : IOSZ;
		fill(buf, off, n, seed);
		ssize_t w = pwrite(fd, buf, n, (off_t)off);
		if (w != (ssize_t)n)
			return die("pwrite");
		off += n;
		len -= n;
	}
	/* For buffered writes this is the FLUSH path: writeback, then NBD_CMD_FLUSH. */
	if (fsync(fd))
		return die("fsync");
	if (close(fd))
		return die("close");
	return 0;
}

static int cmd_check(const char *dev, uint64_t off, uint64_t len, uint64_t seed)
{
	if (off % 512 || len % 512) {
		fprintf(stderr, "mmapcheck: O_DIRECT needs 512-byte alignment\n");
		return 1;
	}
	/* O_DIRECT so the check sees the device, not a cached copy. */
	int fd = open(dev, O_RDONLY | O_DIRECT);
	if (fd < 0)
		return die("open");
	uint8_t *buf = aligned(IOSZ);
	while (len) {
		size_t n = len < IOSZ ? len : IOSZ;
		ssize_t r = pread(fd, buf, n, (off_t)off);
		if (r != (ssize_t)n)
			return die("pread");
		if (compare(buf, off, n, seed))
			return 1;
		off += n;
		len -= n;
	}
	close(fd);
	return 0;
}

static volatile sig_atomic_t cur_piece = -1;

static void on_sigbus(int sig)
{
	char msg[64];
	int n = snprintf(msg, sizeof msg, "ERR %d SIGBUS\n", (int)cur_piece);
	(void)sig;
	if (write(1, msg, n) < 0)
		_exit(1);
	_exit(1);
}

static int cmd_mloop(const char *dev, uint64_t off, uint64_t piece, uint64_t count,
		     uint64_t seed)
{
	if (off % ALIGN || piece % ALIGN || !piece || !count) {
		fprintf(stderr, "mmapcheck: mloop needs page-aligned OFF and PIECE\n");
		return 1;
	}
	signal(SIGBUS, on_sigbus);
	int fd = open(dev, O_RDWR);
	if (fd < 0)
		return die("open");
	uint64_t len = piece * count;
	uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
	if (m == MAP_FAILED)
		return die("mmap");
	for (uint64_t i = 0; i < count; i++) {
		cur_piece = (sig_atomic_t)i;
		fill(m + i * piece, off + i * piece, piece, seed);
		if (msync(m + i * piece, piece, MS_SYNC)) {
			printf("ERR %llu msync %s\n", (unsigned long long)i, strerror(errno));
			fflush(stdout);
			return 1;
		}
		struct timespec t;
		clock_gettime(CLOCK_BOOTTIME, &t);
		printf("%llu %lld.%02ld\n", (unsigned long long)i, (long long)t.tv_sec,
		       t.tv_nsec / 10000000);
		fflush(stdout);
	}
	if (munmap(m, len))
		return die("munmap");
	if (close(fd))
		return die("close");
	return 0;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Cold caches for the next step: the device's buffer cache and the page cache. */
static int drop_caches(int fd)
{
	if (ioctl(fd, BLKFLSBUF, 0))
		return die("BLKFLSBUF");
	int p = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (p < 0)
		return die("open drop_caches");
	if (write(p, "3", 1) != 1)
		return die("drop_caches");
	close(p);
	return 0;
}

static int cmd_mbench(const char *dev, uint64_t off, uint64_t len, uint64_t seed)
{
	if (off % ALIGN || !len) {
		fprintf(stderr, "mmapcheck: mbench needs a page-aligned OFF and LEN > 0\n");
		return 1;
	}
	uint8_t *want = aligned(len), *got = aligned(len);
	fill(want, off, len, seed);
	memset(got, 0, len);
	int fd = open(dev, O_RDWR);
	if (fd < 0)
		return die("open");
	if (drop_caches(fd))
		return 1;
	double t0 = now();
	uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
	if (m == MAP_FAILED)
		return die("mmap");
	memcpy(m, want, len);
	if (msync(m, len, MS_SYNC))
		return die("msync");
	if (munmap(m, len))
		return die("munmap");
	double t1 = now();
	if (drop_caches(fd))
		return 1;
	double t2 = now();
	m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, (off_t)off);
	if (m == MAP_FAILED)
		return die("mmap");
	memcpy(got, m, len);
	if (munmap(m, len))
		return die("munmap");
	double t3 = now();
	close(fd);
	if (memcmp(got, want, len))
		return compare(got, off, len, seed);
	printf("write_s=%.4f read_s=%.4f\n", t1 - t0, t3 - t2);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 7 && !strcmp(argv[1], "mloop"))
		return cmd_mloop(argv[2], num(argv[3]), num(argv[4]), num(argv[5]), num(argv[6]));
	if (argc == 5 && !strcmp(argv[1], "gen"))
		return cmd_gen(num(argv[2]), num(argv[3]), num(argv[4]));
	if (argc != 6) {
		fprintf(stderr, "usage: mmapcheck gen OFF LEN SEED | "
				"{mmap|dwrite|fwrite|check|mcheck|mbench} DEV OFF LEN SEED\n");
		return 2;
	}
	const char *cmd = argv[1], *dev = argv[2];
	uint64_t off = num(argv[3]), len = num(argv[4]), seed = 0;
	if (!strcmp(argv[5], "zero"))
		zero_mode = 1;
	else
		seed = num(argv[5]);
	if (!strcmp(cmd, "mmap"))
		return cmd_mmap(dev, off, len, seed, 0);
	if (!strcmp(cmd, "mcheck"))
		return cmd_mmap(dev, off, len, seed, 1);
	if (!strcmp(cmd, "dwrite"))
		return cmd_write(dev, off, len, seed, 1);
	if (!strcmp(cmd, "fwrite"))
		return cmd_write(dev, off, len, seed, 0);
	if (!strcmp(cmd, "check"))
		return cmd_check(dev, off, len, seed);
	if (!strcmp(cmd, "mbench") && !zero_mode)
		return cmd_mbench(dev, off, len, seed);
	fprintf(stderr, "mmapcheck: unknown command %s\n", cmd);
	return 2;
}
