/* The element phases of spec/rule.md on the CPU: Philox4x32-10 bits, the noise, and P1/P2/P3 (with
 * decay) applied to a contiguous slice of one tuned tensor, for many steps per call.
 *
 * It exists for speed. A slice is cut into chunks that fit L1; a chunk is widened to binary32 once,
 * every step of the call runs on it there, and it is written back once. Philox runs on 16 blocks at a
 * time and the phases on 16 elements at a time, written with GCC/Clang vector types so that one source
 * compiles to AVX-512, AVX2 or SSE2 (picked at run time on x86-64) and to NEON elsewhere. Vector lanes
 * do the same IEEE binary32 operations as scalar code, so the width changes no bit; the tests hold the
 * kernel to the numpy reference bit for bit.
 *
 * Every product formed is exact in binary32 (spec/rule.md), so whether the compiler fuses a multiply-add
 * does not matter; it is built with -ffp-contract=off all the same, and never with -ffast-math (which
 * would flush subnormals). The bf16 and f16 roundings are integer formulas plus, for f16 subnormals,
 * one binary32 addition whose own rounding is the one required. Loaded with ctypes: no Python API.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86 1
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { GAUSSIAN16 = 0, RADEMACHER16 = 1 };
enum { REPLAY = 0, PERTURB = 1, RESTORE_UPDATE = 2, UPDATE_PERTURB = 3 };

#define W 16          /* lanes: Philox blocks or elements handled together */
#define CHUNK 2048    /* elements per chunk: x and z take 16 KiB, in L1 across a call's steps */

typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint64_t vq __attribute__((vector_size(8 * W)));

#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
INLINE float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* ---- scalar conversions, used once per element per call (widening and writing back a chunk) ---- */

INLINE float load(const void *w, int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (dtype == BF16) return u2f((uint32_t)h << 16);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return u2f(sign | 0x7F800000u | (m << 13));       /* inf, NaN */
    if (e == 0) {                                                    /* zero, subnormal: exact */
        float v = (float)m * u2f(0x33800000u);                       /* m * 2^-24 */
        return sign ? -v : v;
    }
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

/* The bits of x, a value the dtype holds exactly (every value in a chunk has been rounded already). */
INLINE void store(void *w, int dtype, int64_t i, float x) {
    uint32_t u = f2u(x), a = u & 0x7FFFFFFFu, sign = (u >> 16) & 0x8000;
    if (dtype == F32) ((float *)w)[i] = x;
    else if (dtype == BF16) ((uint16_t *)w)[i] = (uint16_t)(u >> 16);
    else if (a > 0x7F800000u) ((uint16_t *)w)[i] = 0x7E00;                                /* NaN */
    else if (a >= 0x47800000u) ((uint16_t *)w)[i] = (uint16_t)(sign | 0x7C00);            /* inf */
    else if (a >= 0x38800000u) ((uint16_t *)w)[i] = (uint16_t)(sign | ((a >> 13) - (112u << 10)));
    else ((uint16_t *)w)[i] = (uint16_t)(sign | (uint32_t)(u2f(a) * 16777216.0f));         /* k * 2^-24 */
}

/* ---- 16 lanes ---- */

#define SPLAT(type, x) ((type){0} + (x))

INLINE vu select_(vi keep, vu a, vu b) { return ((vu)keep & a) | (~(vu)keep & b); }

/* |x|'s bits, below 2^31, as signed lanes; above(a, k) is all ones where a > k (both in [0, 2^31)):
 * the sign of k - a. A subtraction and a shift split into narrower registers where comparison
 * operators do not (GCC turns 16-lane comparisons into scalar code under AVX2). */
INLINE vi abs_bits(vu u) { return (vi)(u & 0x7FFFFFFFu); }
INLINE vi above(vi a, int32_t k) { return (k - a) >> 31; }

/* R_D of spec/rule.md as a value: x rounded to bf16 (nearest, ties to even; NaN -> the quiet NaN). */
INLINE vf round_bf16(vf x) {
    vu u = (vu)x;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return (vf)select_(above(abs_bits(u), 0x7F800000), SPLAT(vu, 0x7FC00000u), r);
}

/* x rounded to f16 and widened back. Below 2^-14 the result is a multiple of 2^-24, and |x| + 0.5
 * (whose ulp is 2^-24) rounds to exactly that multiple, ties to even: the addition does the rounding. */
INLINE vf round_f16(vf x) {
    vu u = (vu)x, a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
    vi ai = (vi)a;
    vu normal = (a + 0x0FFFu + ((a >> 13) & 1u)) & 0xFFFFE000u;
    vu subnormal = (vu)(((vf)a + 0.5f) - 0.5f);
    vu r = select_(above(ai, 0x387FFFFF), normal, subnormal);
    r = select_(above(ai, 0x477FEFFF), SPLAT(vu, 0x7F800000u), r) | sign;     /* rounds beyond 65504: inf */
    return (vf)select_(above(ai, 0x7F800000), SPLAT(vu, 0x7FC00000u), r);
}

INLINE vf round_to(int dtype, vf x) {
    return dtype == BF16 ? round_bf16(x) : dtype == F16 ? round_f16(x) : x;
}

/* DECAY of spec/rule.md: s - d*hi - d*lo with 12-bit hi, skipped for inf, NaN and |s| < 2^-60. */
INLINE vf decay(vf s, float d) {
    vi a = abs_bits((vu)s);
    vf hi = (vf)((vu)s & 0xFFFFF000u);
    vf lo = s - hi;
    vf t = s - d * hi;
    vf r = t - d * lo;
    return (vf)select_(above(a, 0x217FFFFF) & ~above(a, 0x7F7FFFFF), (vu)r, (vu)s);
}

INLINE void mulhilo(uint32_t m, vu a, vu *hi, vu *lo) {
    vq p = __builtin_convertvector(a, vq) * (uint64_t)m;
    *hi = __builtin_convertvector(p >> 32, vu);
    *lo = __builtin_convertvector(p, vu);
}

/* Philox4x32-10 of 16 consecutive blocks b0 .. b0+15 (counter: block low, block high, tensor, step). */
INLINE void philox16(uint64_t b0, uint32_t index, uint32_t t, uint32_t k0, uint32_t k1, vu c[4]) {
    vq b = SPLAT(vq, b0);
    for (int l = 0; l < W; l++) b[l] += (uint64_t)l;
    c[0] = __builtin_convertvector(b, vu);
    c[1] = __builtin_convertvector(b >> 32, vu);
    c[2] = SPLAT(vu, index);
    c[3] = SPLAT(vu, t);
    for (int r = 0; r < 10; r++) {
        vu hi0, lo0, hi1, lo1;
        mulhilo(0xD2511F53u, c[0], &hi0, &lo0);
        mulhilo(0xCD9E8D57u, c[2], &hi1, &lo1);
        c[0] = hi1 ^ c[1] ^ k0;
        c[1] = lo1;
        c[2] = hi0 ^ c[3] ^ k1;
        c[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* z of elements i0 .. i0+m-1 of step t into z[0 .. m-1]. Element 8b+q takes 16-bit half q of block b:
 * word q/2, low half first. Each instruction set's apply_ passes its own (noise_fn), inlined there. */
typedef void (*noise_fn)(float *z, uint64_t i0, int64_t m, uint32_t index, uint32_t t, uint32_t k0,
                         uint32_t k1, int noise, const float *table);

/* The 16-bit draws of blocks first .. last, in element order, and u: element i0's draw. */
#define NOISE_BITS                                                                                       \
    uint16_t bits[CHUNK + 8 + 8 * W] __attribute__((aligned(64)));                                       \
    uint64_t first = i0 >> 3, last = (i0 + (uint64_t)m - 1) >> 3;                                       \
    const uint16_t *u = bits + (i0 & 7)

INLINE void lookup(float *z, const uint16_t *u, int64_t m, int noise, const float *table) {
    if (noise == GAUSSIAN16)
        for (int64_t q = 0; q < m; q++) z[q] = table[u[q]];
    else
        for (int64_t q = 0; q < m; q++) z[q] = u[q] < 32768 ? -1.0f : 1.0f;
}

INLINE void make_noise(float *z, uint64_t i0, int64_t m, uint32_t index, uint32_t t, uint32_t k0,
                       uint32_t k1, int noise, const float *table) {
    NOISE_BITS;
    for (uint64_t b = first; b <= last; b += W) {
        vu c[4];
        philox16(b, index, t, k0, k1, c);
        uint16_t *out = bits + 8 * (b - first);
        for (int l = 0; l < W; l++)
            for (int k = 0; k < 4; k++) {
                out[8 * l + 2 * k] = (uint16_t)c[k][l];
                out[8 * l + 2 * k + 1] = (uint16_t)(c[k][l] >> 16);
            }
    }
    lookup(z, u, m, noise, table);
}

#ifdef X86
/* Philox and the word layout again, in AVX2 intrinsics: from 16-lane generic vectors GCC makes a 64-bit
 * vector product of three multiplies or a shift-and-add chain per constant, narrows it back with
 * shuffles, spills the 16-lane state, and stores the words one by one. Here each 32x32->64 product is
 * one vpmuludq (even lanes, then the odd lanes shifted down, blended back), two groups of 8 blocks are
 * interleaved so that one's multiplies hide the other's latency, and the 4x8 word transpose is six
 * unpacks and four lane permutes. The same integer operations give the same words: the same bits
 * (measured twice as fast on an AVX2 core for F32 Gaussian replay, 2026-12-01). */
#define AVX2_FN __attribute__((target("avx2"))) INLINE

AVX2_FN void round_avx2(__m256i *c0, __m256i *c1, __m256i *c2, __m256i *c3, __m256i m0, __m256i m1,
                        __m256i k0, __m256i k1) {
    __m256i e0 = _mm256_mul_epu32(*c0, m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(*c0, 32), m0);
    __m256i e1 = _mm256_mul_epu32(*c2, m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(*c2, 32), m1);
    __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
    __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
    __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
    __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
    *c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, *c1), k0);
    *c1 = lo1;
    *c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, *c3), k1);
    *c3 = lo0;
}

/* The four words of 8 consecutive blocks (lane l of c0..c3: block l) into out[0 .. 64) in element order. */
AVX2_FN void words_avx2(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint16_t *out) {
    __m256i a01 = _mm256_unpacklo_epi32(c0, c1), b01 = _mm256_unpackhi_epi32(c0, c1);
    __m256i a23 = _mm256_unpacklo_epi32(c2, c3), b23 = _mm256_unpackhi_epi32(c2, c3);
    /* 128-bit lane L of r_i: block 4L + i's four words, in order */
    __m256i r0 = _mm256_unpacklo_epi64(a01, a23), r1 = _mm256_unpackhi_epi64(a01, a23);
    __m256i r2 = _mm256_unpacklo_epi64(b01, b23), r3 = _mm256_unpackhi_epi64(b01, b23);
    _mm256_storeu_si256((__m256i *)(out + 0), _mm256_permute2x128_si256(r0, r1, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(r2, r3, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 32), _mm256_permute2x128_si256(r0, r1, 0x31));
    _mm256_storeu_si256((__m256i *)(out + 48), _mm256_permute2x128_si256(r2, r3, 0x31));
}

AVX2_FN void make_noise_avx2(float *z, uint64_t i0, int64_t m, uint32_t index, uint32_t t, uint32_t k0,
                             uint32_t k1, int noise, const float *table) {
    NOISE_BITS;
    const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u), m1 = _mm256_set1_epi32((int)0xCD9E8D57u);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (uint64_t b = first; b <= last; b += 16) {
        __m256i a0, a1, a2, a3, b0, b1, b2, b3;
        if ((uint32_t)b <= 0xFFFFFFFFu - 15) {  /* no carry into the block's high word in these 16 */
            a0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)b), iota);
            b0 = _mm256_add_epi32(a0, _mm256_set1_epi32(8));
            a1 = b1 = _mm256_set1_epi32((int)(uint32_t)(b >> 32));
        } else {
            uint32_t lo[16], hi[16];
            for (int l = 0; l < 16; l++) {
                lo[l] = (uint32_t)(b + (uint64_t)l);
                hi[l] = (uint32_t)((b + (uint64_t)l) >> 32);
            }
            a0 = _mm256_loadu_si256((const __m256i *)lo);
            b0 = _mm256_loadu_si256((const __m256i *)(lo + 8));
            a1 = _mm256_loadu_si256((const __m256i *)hi);
            b1 = _mm256_loadu_si256((const __m256i *)(hi + 8));
        }
        a2 = b2 = _mm256_set1_epi32((int)index);
        a3 = b3 = _mm256_set1_epi32((int)t);
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < 10; r++) {
            __m256i kav = _mm256_set1_epi32((int)ka), kbv = _mm256_set1_epi32((int)kb);
            round_avx2(&a0, &a1, &a2, &a3, m0, m1, kav, kbv);
            round_avx2(&b0, &b1, &b2, &b3, m0, m1, kav, kbv);
            ka += 0x9E3779B9u;
            kb += 0xBB67AE85u;
        }
        uint16_t *out = bits + 8 * (b - first);
        words_avx2(a0, a1, a2, a3, out);
        words_avx2(b0, b1, b2, b3, out + 64);
    }
    lookup(z, u, m, noise, table);
}
#endif

/* One chunk of `mode` (see mezo_apply) on x[0 .. m), with m rounded up to W: the lanes past m hold
 * zeros and are never written back. */
INLINE void phases(int dtype, int mode, int decayed, float *x, const float *z, int64_t m, float e, float e2,
                   float sc, float c, float d) {
    for (int64_t q = 0; q < m; q += W) {
        vf xv, zv;
        memcpy(&xv, x + q, sizeof xv);
        memcpy(&zv, z + q, sizeof zv);
        if (mode == PERTURB) {
            xv = round_to(dtype, xv + sc * zv);
        } else {
            vf a = e * zv;
            if (mode == REPLAY) {
                xv = round_to(dtype, xv + a);              /* P1 */
                xv = round_to(dtype, xv - e2 * zv);        /* P2 */
            }
            vf s = xv + a;                                 /* P3 */
            if (decayed) s = decay(s, d);
            xv = round_to(dtype, s - c * zv);
        }
        memcpy(x + q, &xv, sizeof xv);
    }
}

/* phases() with constant dtype, mode (REPLAY, PERTURB or RESTORE_UPDATE) and decay flag: each case
 * compiles to its own loop. The decay test is hoisted out of the loop rather than made per vector: with a
 * branch inside, GCC kept the 16-lane sum in memory and reassembled it through general registers under
 * AVX2, which made RESTORE_UPDATE with decay three times slower than without (measured, GCC 12). */
INLINE void chunk_phases(int dtype, int mode, float *x, const float *z, int64_t m, float e, float e2, float sc,
                         float c, float d) {
#define PHASES(DT, MODE, DECAYED) phases(DT, MODE, DECAYED, x, z, m, e, e2, sc, c, d)
#define DECAYING(DT, MODE) if (d != 0.0f) PHASES(DT, MODE, 1); else PHASES(DT, MODE, 0)
    switch (dtype * 3 + mode) {
    case F32 * 3 + REPLAY: DECAYING(F32, REPLAY); break;
    case F32 * 3 + PERTURB: PHASES(F32, PERTURB, 0); break;
    case F32 * 3 + RESTORE_UPDATE: DECAYING(F32, RESTORE_UPDATE); break;
    case BF16 * 3 + REPLAY: DECAYING(BF16, REPLAY); break;
    case BF16 * 3 + PERTURB: PHASES(BF16, PERTURB, 0); break;
    case BF16 * 3 + RESTORE_UPDATE: DECAYING(BF16, RESTORE_UPDATE); break;
    case F16 * 3 + REPLAY: DECAYING(F16, REPLAY); break;
    case F16 * 3 + PERTURB: PHASES(F16, PERTURB, 0); break;
    default: DECAYING(F16, RESTORE_UPDATE);
    }
#undef DECAYING
#undef PHASES
}

INLINE void apply_body(void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index,
                       uint32_t first, int64_t nsteps, const double *c, const double *d, double eps,
                       double scale, int noise, const float *table, int mode, noise_fn make_noise) {
    float x[CHUNK] __attribute__((aligned(64)));
    float z[CHUNK] __attribute__((aligned(64)));
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float e = (float)eps, e2 = (float)(2.0 * eps), sc = (float)scale;
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK, padded = (m + W - 1) / W * W;
        for (int64_t q = 0; q < m; q++) x[q] = load(w, dtype, base + q);
        for (int64_t q = m; q < padded; q++) x[q] = 0.0f;
        for (int64_t j = 0; j < (mode == REPLAY ? nsteps : 1); j++) {
            make_noise(z, start + (uint64_t)base, m, index, first + (uint32_t)j, k0, k1, noise, table);
            for (int64_t q = m; q < padded; q++) z[q] = 0.0f;
            float cj = (float)c[mode == REPLAY ? j : 0], dj = (float)d[mode == REPLAY ? j : 0];
            chunk_phases(dtype, mode == UPDATE_PERTURB ? RESTORE_UPDATE : mode, x, z, padded, e, e2, sc, cj, dj);
        }
        if (mode == UPDATE_PERTURB) {  /* P1 of step first + 1 (the counter word wraps at 2^32) on the chunk */
            make_noise(z, start + (uint64_t)base, m, index, first + 1u, k0, k1, noise, table);
            for (int64_t q = m; q < padded; q++) z[q] = 0.0f;
            chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);
        }
        for (int64_t q = 0; q < m; q++) store(w, dtype, base + q, x[q]);
    }
}

/* ---- the multi-term P3 (spec/momentum.md): s = DECAY(x + e*z_t); s -= c_j * z_(s_j) in order; R_D(s) ---- */

/* s[0 .. m) = DECAY(x + e*z) (x, z padded to W). */
INLINE void restore_sum(float *s, const float *x, const float *z, int64_t m, float e, float d) {
    for (int64_t q = 0; q < m; q += W) {
        vf xv, zv;
        memcpy(&xv, x + q, sizeof xv);
        memcpy(&zv, z + q, sizeof zv);
        vf sv = xv + e * zv;
        if (d != 0.0f) sv = decay(sv, d);
        memcpy(s + q, &sv, sizeof sv);
    }
}

/* s -= c * z: the product exact, one binary32 rounding per element. */
INLINE void subtract_term(float *s, const float *z, int64_t m, float c) {
    for (int64_t q = 0; q < m; q += W) {
        vf sv, zv;
        memcpy(&sv, s + q, sizeof sv);
        memcpy(&zv, z + q, sizeof zv);
        sv = sv - c * zv;
        memcpy(s + q, &sv, sizeof sv);
    }
}

INLINE void round_chunk(int dtype, float *x, const float *s, int64_t m) {
    for (int64_t q = 0; q < m; q += W) {
        vf sv;
        memcpy(&sv, s + q, sizeof sv);
        sv = round_to(dtype, sv);
        memcpy(x + q, &sv, sizeof sv);
    }
}

/* The z of step t for the chunk at element i0, from a ring of `ring` slots keyed by step (slot t % ring):
 * a replay of a window-K rule with ring = K draws each step's noise once per chunk. */
INLINE float *ring_noise(float *zring, int64_t *tags, int ring, uint32_t t, uint64_t i0, int64_t m,
                         int64_t padded, uint32_t index, uint32_t k0, uint32_t k1, int noise,
                         const float *table, noise_fn make_noise) {
    int slot = (int)(t % (uint32_t)ring);
    float *z = zring + (int64_t)slot * CHUNK;
    if (tags[slot] != (int64_t)t) {
        make_noise(z, i0, m, index, t, k0, k1, noise, table);
        for (int64_t q = m; q < padded; q++) z[q] = 0.0f;
        tags[slot] = (int64_t)t;
    }
    return z;
}

/* mode REPLAY: P1, P2 and the multi-term P3 for steps first .. first+nsteps-1; RESTORE_UPDATE: the
 * multi-term P3 of step `first` alone; UPDATE_PERTURB: that P3, then P1 of step first + 1. Step j's terms are toff[j] .. toff[j+1]-1 of (tstep, tc). */
INLINE void terms_body(void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index,
                       uint32_t first, int64_t nsteps, const double *d, double eps, int noise,
                       const float *table, int mode, const int64_t *toff, const uint32_t *tstep,
                       const double *tc, int ring, float *zring, noise_fn make_noise) {
    float x[CHUNK] __attribute__((aligned(64)));
    float s[CHUNK] __attribute__((aligned(64)));
    int64_t tags[64];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float e = (float)eps, e2 = (float)(2.0 * eps);
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK, padded = (m + W - 1) / W * W;
        uint64_t i0 = start + (uint64_t)base;
        for (int r = 0; r < ring; r++) tags[r] = -1;
        for (int64_t q = 0; q < m; q++) x[q] = load(w, dtype, base + q);
        for (int64_t q = m; q < padded; q++) x[q] = 0.0f;
        for (int64_t j = 0; j < (mode == REPLAY ? nsteps : 1); j++) {
            uint32_t t = first + (uint32_t)j;
            float *z = ring_noise(zring, tags, ring, t, i0, m, padded, index, k0, k1, noise, table, make_noise);
            if (mode == REPLAY) {
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);     /* P1 */
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, -e2, 0.0f, 0.0f);   /* P2: x + (-2e)z = x - 2e z */
            }
            restore_sum(s, x, z, padded, e, (float)d[j]);
            for (int64_t q = toff[j]; q < toff[j + 1]; q++) {
                const float *zq = ring_noise(zring, tags, ring, tstep[q], i0, m, padded, index, k0, k1, noise,
                                             table, make_noise);
                subtract_term(s, zq, padded, (float)tc[q]);
            }
            round_chunk(dtype, x, s, padded);
        }
        if (mode == UPDATE_PERTURB) {  /* P1 of step first + 1 on P3's rounded result: PERTURB's bits */
            float *z = ring_noise(zring, tags, ring, first + 1u, i0, m, padded, index, k0, k1, noise, table,
                                  make_noise);
            chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);
        }
        for (int64_t q = 0; q < m; q++) store(w, dtype, base + q, x[q]);
    }
}

#define TARGS void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first, \
              int64_t nsteps, const double *d, double eps, int noise, const float *table, int mode,         \
              const int64_t *toff, const uint32_t *tstep, const double *tc, int ring, float *zring
#define TPASS w, dtype, n, start, seed, index, first, nsteps, d, eps, noise, table, mode, toff, tstep, tc, ring, zring

static void terms_generic(TARGS) { terms_body(TPASS, make_noise); }
#ifdef X86
__attribute__((target("avx2"))) static void terms_avx2(TARGS) { terms_body(TPASS, make_noise_avx2); }
__attribute__((target("avx512f,avx512bw"))) static void terms_avx512(TARGS) { terms_body(TPASS, make_noise); }
#endif

/* ---- mezo-momentum-buffer (spec/momentum.md): m = fl32(fl32(beta*m) + c*z); w = R_D(DECAY(w + e*z) - m) ---- */

/* beta * m is rounded on its own: this file is built with -ffp-contract=off, so the compiler never fuses it
 * with the addition (the one product of the spec that is not exact). */
INLINE void buffer_p3(int dtype, float *x, float *mv, const float *z, int64_t m, float e, float c, float beta,
                      float d) {
    for (int64_t q = 0; q < m; q += W) {
        vf xv, zv, hv;
        memcpy(&xv, x + q, sizeof xv);
        memcpy(&zv, z + q, sizeof zv);
        memcpy(&hv, mv + q, sizeof hv);
        vf scaled = beta * hv;
        hv = scaled + c * zv;
        vf sv = xv + e * zv;
        if (d != 0.0f) sv = decay(sv, d);
        xv = round_to(dtype, sv - hv);
        memcpy(x + q, &xv, sizeof xv);
        memcpy(mv + q, &hv, sizeof hv);
    }
}

INLINE void buffer_body(void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index,
                        uint32_t first, int64_t nsteps, const double *c, const double *d, double eps, double beta,
                        int noise, const float *table, int mode, float *state, noise_fn make_noise) {
    float x[CHUNK] __attribute__((aligned(64)));
    float z[CHUNK] __attribute__((aligned(64)));
    float mv[CHUNK] __attribute__((aligned(64)));
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float e = (float)eps, e2 = (float)(2.0 * eps), b = (float)beta;
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK, padded = (m + W - 1) / W * W;
        for (int64_t q = 0; q < m; q++) x[q] = load(w, dtype, base + q);
        for (int64_t q = 0; q < m; q++) mv[q] = state[base + q];
        for (int64_t q = m; q < padded; q++) x[q] = mv[q] = 0.0f;
        for (int64_t j = 0; j < (mode == REPLAY ? nsteps : 1); j++) {
            make_noise(z, start + (uint64_t)base, m, index, first + (uint32_t)j, k0, k1, noise, table);
            for (int64_t q = m; q < padded; q++) z[q] = 0.0f;
            if (mode == REPLAY) {
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);     /* P1 */
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, -e2, 0.0f, 0.0f);   /* P2 */
            }
            buffer_p3(dtype, x, mv, z, padded, e, (float)c[j], b, (float)d[j]);
        }
        if (mode == UPDATE_PERTURB) {  /* P1 of step first + 1 on P3's rounded result */
            make_noise(z, start + (uint64_t)base, m, index, first + 1u, k0, k1, noise, table);
            for (int64_t q = m; q < padded; q++) z[q] = 0.0f;
            chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);
        }
        for (int64_t q = 0; q < m; q++) store(w, dtype, base + q, x[q]);
        for (int64_t q = 0; q < m; q++) state[base + q] = mv[q];
    }
}

#define BARGS void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first, \
              int64_t nsteps, const double *c, const double *d, double eps, double beta, int noise,         \
              const float *table, int mode, float *state
#define BPASS w, dtype, n, start, seed, index, first, nsteps, c, d, eps, beta, noise, table, mode, state

static void buffer_generic(BARGS) { buffer_body(BPASS, make_noise); }
#ifdef X86
__attribute__((target("avx2"))) static void buffer_avx2(BARGS) { buffer_body(BPASS, make_noise_avx2); }
__attribute__((target("avx512f,avx512bw"))) static void buffer_avx512(BARGS) { buffer_body(BPASS, make_noise); }
#endif

#define ARGS void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first, \
             int64_t nsteps, const double *c, const double *d, double eps, double scale, int noise,         \
             const float *table, int mode
#define PASS w, dtype, n, start, seed, index, first, nsteps, c, d, eps, scale, noise, table, mode

static void apply_generic(ARGS) { apply_body(PASS, make_noise); }

#ifdef X86
__attribute__((target("avx2"))) static void apply_avx2(ARGS) { apply_body(PASS, make_noise_avx2); }
/* AVX-512 keeps the generic noise: no AVX-512 machine was at hand to measure or test another. */
__attribute__((target("avx512f,avx512bw"))) static void apply_avx512(ARGS) { apply_body(PASS, make_noise); }
#endif

enum { GENERIC = 0, AVX2 = 1, AVX512 = 2 };

/* The widest instruction set this CPU runs the kernel with: 2 AVX-512, 1 AVX2, 0 the compiler's
 * baseline (SSE2 on x86-64). */
int mezo_best_isa(void) {
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return AVX512;
    if (__builtin_cpu_supports("avx2")) return AVX2;
#endif
    return GENERIC;
}

/* Elements [start, start + n) of tensor `index` (data at w), steps first .. first + nsteps - 1, with
 * the instruction set `isa` (at most mezo_best_isa(); the tests run every one the CPU has).
 * mode REPLAY: P1, P2, P3 per step with c[j], d[j]; PERTURB: w += scale*z for step `first`;
 * RESTORE_UPDATE: P3 of step `first` with c[0], d[0]; UPDATE_PERTURB: that P3, then P1 of step
 * first + 1 (w += eps*z) on its rounded result, in the same pass (training's step-to-step pass). Each
 * chunk, widened once, goes through RESTORE_UPDATE's loop and then PERTURB's, the very code of the two
 * calls, so the bytes are theirs; what is saved is a load and a store of the weights. Measured on a
 * 2-core AMD EPYC (AVX2, 2^22 elements, CPU time, tools/bench_fused_pass.py): 2-10% less than the two
 * calls, since making the noise of two steps is most of either; on a GPU the pass is memory bound. */
void mezo_apply(int isa, ARGS) {
#ifdef X86
    if (isa == AVX512) { apply_avx512(PASS); return; }
    if (isa == AVX2) { apply_avx2(PASS); return; }
#endif
    (void)isa;
    apply_generic(PASS);
}

/* The multi-term P3 (spec/momentum.md) on elements [start, start + n) of tensor `index`: mode REPLAY (0)
 * runs P1, P2 and the multi-term P3 for steps first .. first + nsteps - 1 (d[j]: step j's decay factor);
 * RESTORE_UPDATE (2) the multi-term P3 of step `first` alone; UPDATE_PERTURB (3) that P3, then P1 of step
 * first + 1, in one pass (training's step-to-step pass). Step j's terms, in order, are (tstep[q],
 * tc[q]) for q in toff[j] .. toff[j+1]-1. ring (1..64): noise slots per chunk, a cache keyed by step.
 * Returns 0, or -1 if the ring could not be allocated. */
int mezo_apply_terms(int isa, void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index,
                     uint32_t first, int64_t nsteps, const double *d, double eps, int noise, const float *table,
                     int mode, const int64_t *toff, const uint32_t *tstep, const double *tc, int ring) {
    if (ring < 1) ring = 1;
    if (ring > 64) ring = 64;
    float *zring = malloc((size_t)ring * CHUNK * sizeof(float));
    if (zring == NULL) return -1;
#ifdef X86
    if (isa == AVX512) terms_avx512(TPASS);
    else if (isa == AVX2) terms_avx2(TPASS);
    else terms_generic(TPASS);
#else
    (void)isa;
    terms_generic(TPASS);
#endif
    free(zring);
    return 0;
}

/* mezo-momentum-buffer (spec/momentum.md) on elements [start, start + n) of tensor `index`, with their binary32
 * states at `state` (n floats, updated in place): mode REPLAY (0) runs P1, P2 and this form's P3 for steps
 * first .. first + nsteps - 1 with c[j], d[j]; RESTORE_UPDATE (2) its P3 of step `first` alone;
 * UPDATE_PERTURB (3) that P3, then P1 of step first + 1. */
void mezo_apply_buffer(int isa, BARGS) {
#ifdef X86
    if (isa == AVX512) { buffer_avx512(BPASS); return; }
    if (isa == AVX2) { buffer_avx2(BPASS); return; }
#endif
    (void)isa;
    buffer_generic(BPASS);
}

/* ---- mezo-adam and mezo-adam-buffer (spec/adam.md) ----
 * Three kinds of operation here are not exact: products with too many significant bits (beta*m, u*g,
 * g*g, u*gg, r*h, alpha*m, cv*(z*z)), a square root and a division. The file is built with
 * -ffp-contract=off, so no product is fused with the addition after it; the square root is SSE's sqrtps
 * on x86 (sqrtf elsewhere) and the division the vector `/` (divps): both IEEE correctly rounded, never the
 * rcpps / rsqrtps estimates (which only -ffast-math would let the compiler use; it is never used). */

/* The correctly rounded root of 16 lanes, one per instruction-set build (each build passes its own,
 * inlined there): SSE's sqrtps on 4 lanes at a time (x86-64's baseline), AVX's on 8, AVX-512's on 16. */
typedef vf (*sqrt_fn)(vf v);

INLINE vf vsqrt(vf v) {
    vf r;
#ifdef X86
    for (int l = 0; l < W; l += 4) {
        __m128 a;
        memcpy(&a, (float *)&v + l, sizeof a);
        a = _mm_sqrt_ps(a);
        memcpy((float *)&r + l, &a, sizeof a);
    }
#else
    for (int l = 0; l < W; l++) r[l] = __builtin_sqrtf(v[l]);
#endif
    return r;
}

#ifdef X86
AVX2_FN vf vsqrt_avx2(vf v) {
    vf r;
    for (int l = 0; l < W; l += 8) {
        __m256 a;
        memcpy(&a, (float *)&v + l, sizeof a);
        a = _mm256_sqrt_ps(a);
        memcpy((float *)&r + l, &a, sizeof a);
    }
    return r;
}

__attribute__((target("avx512f,avx512bw"))) INLINE vf vsqrt_avx512(vf v) {
    __m512 a;
    memcpy(&a, &v, sizeof a);
    a = _mm512_sqrt_ps(a);
    vf r;
    memcpy(&r, &a, sizeof r);
    return r;
}
#endif

/* P3 from this step's m and v: r = sqrt(v); den = r*h + delta; upd = (alpha*m) / den;
 * x = R_D(DECAY(x + e*z) - upd), each operation rounded on its own. */
INLINE void adam_p3(int dtype, float *x, const float *z, const float *mv, const float *vv, int64_t m, float e,
                    float alpha, float h, float delta, float d, sqrt_fn vsqrt) {
    for (int64_t q = 0; q < m; q += W) {
        vf xv, zv, mm, vq2;
        memcpy(&xv, x + q, sizeof xv);
        memcpy(&zv, z + q, sizeof zv);
        memcpy(&mm, mv + q, sizeof mm);
        memcpy(&vq2, vv + q, sizeof vq2);
        vf r = vsqrt(vq2);
        vf rh = r * h;
        vf den = rh + delta;
        vf am = alpha * mm;
        vf upd = am / den;
        vf sv = xv + e * zv;
        if (d != 0.0f) sv = decay(sv, d);
        xv = round_to(dtype, sv - upd);
        memcpy(x + q, &xv, sizeof xv);
    }
}

/* mezo-adam-buffer: g = gq*z (exact); m = b1*m + u1*g; v = b2*v + u2*(g*g), every product rounded alone. */
INLINE void adam_moments_buffer(float *mv, float *vv, const float *z, int64_t m, float gq, float b1, float u1,
                                float b2, float u2) {
    for (int64_t q = 0; q < m; q += W) {
        vf zv, mm, vq2;
        memcpy(&zv, z + q, sizeof zv);
        memcpy(&mm, mv + q, sizeof mm);
        memcpy(&vq2, vv + q, sizeof vq2);
        vf g = gq * zv;
        vf bm = b1 * mm, ug = u1 * g;
        mm = bm + ug;
        vf gg = g * g;
        vf ugg = u2 * gg, bv = b2 * vq2;
        vq2 = bv + ugg;
        memcpy(mv + q, &mm, sizeof mm);
        memcpy(vv + q, &vq2, sizeof vq2);
    }
}

/* mezo-adam: one term of the window: m += cm*z (exact product); v += cv*(z*z) (z*z exact, the product rounded). */
INLINE void adam_moments_term(float *mv, float *vv, const float *z, int64_t m, float cm, float cv) {
    for (int64_t q = 0; q < m; q += W) {
        vf zv, mm, vq2;
        memcpy(&zv, z + q, sizeof zv);
        memcpy(&mm, mv + q, sizeof mm);
        memcpy(&vq2, vv + q, sizeof vq2);
        mm = mm + cm * zv;
        vf zz = zv * zv;
        vf p = cv * zz;
        vq2 = vq2 + p;
        memcpy(mv + q, &mm, sizeof mm);
        memcpy(vv + q, &vq2, sizeof vq2);
    }
}

INLINE void adam_body(void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first,
                      int64_t nsteps, const double *d, double eps, int noise, const float *table, int mode,
                      const int64_t *toff, const uint32_t *tstep, const double *tcm, const double *tcv,
                      const double *alpha, const double *h, double beta1, double beta2, double delta,
                      float *mstate, float *vstate, int ring, float *zring, noise_fn make_noise, sqrt_fn root) {
    float x[CHUNK] __attribute__((aligned(64)));
    float mv[CHUNK] __attribute__((aligned(64)));
    float vv[CHUNK] __attribute__((aligned(64)));
    int64_t tags[64];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float e = (float)eps, e2 = (float)(2.0 * eps);
    float b1 = (float)beta1, u1 = (float)(1.0 - beta1), b2 = (float)beta2, u2 = (float)(1.0 - beta2);
    float dl = (float)delta;
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK, padded = (m + W - 1) / W * W;
        uint64_t i0 = start + (uint64_t)base;
        for (int r = 0; r < ring; r++) tags[r] = -1;
        for (int64_t q = 0; q < m; q++) x[q] = load(w, dtype, base + q);
        for (int64_t q = m; q < padded; q++) x[q] = 0.0f;
        if (mstate != NULL) {
            for (int64_t q = 0; q < m; q++) mv[q] = mstate[base + q];
            for (int64_t q = 0; q < m; q++) vv[q] = vstate[base + q];
            for (int64_t q = m; q < padded; q++) mv[q] = vv[q] = 0.0f;
        }
        for (int64_t j = 0; j < (mode == REPLAY ? nsteps : 1); j++) {
            uint32_t t = first + (uint32_t)j;
            float *z = ring_noise(zring, tags, ring, t, i0, m, padded, index, k0, k1, noise, table, make_noise);
            if (mode == REPLAY) {
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);     /* P1 */
                chunk_phases(dtype, PERTURB, x, z, padded, e, e2, -e2, 0.0f, 0.0f);   /* P2 */
            }
            if (mstate != NULL) {
                adam_moments_buffer(mv, vv, z, padded, (float)tcm[toff[j]], b1, u1, b2, u2);
            } else {
                for (int64_t q = 0; q < padded; q++) mv[q] = vv[q] = 0.0f;
                for (int64_t q = toff[j]; q < toff[j + 1]; q++) {
                    const float *zq = ring_noise(zring, tags, ring, tstep[q], i0, m, padded, index, k0, k1, noise,
                                                 table, make_noise);
                    adam_moments_term(mv, vv, zq, padded, (float)tcm[q], (float)tcv[q]);
                }
            }
            adam_p3(dtype, x, z, mv, vv, padded, e, (float)alpha[j], (float)h[j], dl, (float)d[j], root);
        }
        if (mode == UPDATE_PERTURB) {  /* P1 of step first + 1 on P3's rounded result: PERTURB's bits */
            float *z = ring_noise(zring, tags, ring, first + 1u, i0, m, padded, index, k0, k1, noise, table,
                                  make_noise);
            chunk_phases(dtype, PERTURB, x, z, padded, e, e2, e, 0.0f, 0.0f);
        }
        for (int64_t q = 0; q < m; q++) store(w, dtype, base + q, x[q]);
        if (mstate != NULL) {
            for (int64_t q = 0; q < m; q++) mstate[base + q] = mv[q];
            for (int64_t q = 0; q < m; q++) vstate[base + q] = vv[q];
        }
    }
}

#define AARGS void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first,     \
              int64_t nsteps, const double *d, double eps, int noise, const float *table, int mode,            \
              const int64_t *toff, const uint32_t *tstep, const double *tcm, const double *tcv,                \
              const double *alpha, const double *h, double beta1, double beta2, double delta, float *mstate,   \
              float *vstate, int ring, float *zring
#define APASS w, dtype, n, start, seed, index, first, nsteps, d, eps, noise, table, mode, toff, tstep, tcm, tcv, \
              alpha, h, beta1, beta2, delta, mstate, vstate, ring, zring

static void adam_generic(AARGS) { adam_body(APASS, make_noise, vsqrt); }
#ifdef X86
__attribute__((target("avx2"))) static void adam_avx2(AARGS) { adam_body(APASS, make_noise_avx2, vsqrt_avx2); }
__attribute__((target("avx512f,avx512bw"))) static void adam_avx512(AARGS) {
    adam_body(APASS, make_noise, vsqrt_avx512);
}
#endif

/* mezo-adam (mstate NULL: step j's terms (tstep[q], tcm[q], tcv[q]) for q in toff[j] .. toff[j+1]-1) or
 * mezo-adam-buffer (mstate, vstate: n floats each, updated in place; step j's gq is tcm[toff[j]]) on elements
 * [start, start + n) of tensor `index`; alpha[j], h[j], d[j]: step j's host constants. Modes as
 * mezo_apply_terms. Returns 0, or -1 if the noise ring could not be allocated. */
int mezo_apply_adam(int isa, void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index,
                    uint32_t first, int64_t nsteps, const double *d, double eps, int noise, const float *table,
                    int mode, const int64_t *toff, const uint32_t *tstep, const double *tcm, const double *tcv,
                    const double *alpha, const double *h, double beta1, double beta2, double delta, float *mstate,
                    float *vstate, int ring) {
    if (ring < 1) ring = 1;
    if (ring > 64) ring = 64;
    float *zring = malloc((size_t)ring * CHUNK * sizeof(float));
    if (zring == NULL) return -1;
#ifdef X86
    if (isa == AVX512) adam_avx512(APASS);
    else if (isa == AVX2) adam_avx2(APASS);
    else adam_generic(APASS);
#else
    (void)isa;
    adam_generic(APASS);
#endif
    free(zring);
    return 0;
}
