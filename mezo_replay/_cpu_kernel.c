/* The element phases of spec/rule.md on the CPU: Philox4x32-10 bits, the noise, and P1/P2/P3 (with
 * decay) applied to a contiguous slice of one tuned tensor, for many steps per call.
 *
 * It exists for speed: one pass over the slice per block of steps, noise made in registers, no
 * temporaries. It is held to the numpy reference bit for bit by the tests. Every product it forms is
 * exact in binary32 (spec/rule.md), so whether the compiler fuses a multiply-add does not matter; it is
 * built with -ffp-contract=off all the same, and never with -ffast-math (which would flush subnormals).
 * Loaded with ctypes: no Python API is used.
 */
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { GAUSSIAN16 = 0, RADEMACHER16 = 1 };
enum { REPLAY = 0, PERTURB = 1, RESTORE_UPDATE = 2 };

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0; c[1] = (uint32_t)p1; c[2] = n2; c[3] = (uint32_t)p0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
}

static inline float load(const void *w, int dtype, int64_t i) {
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

static inline uint16_t half_bits(int dtype, float x) {
    uint32_t u = f2u(x);
    uint32_t a = u & 0x7FFFFFFFu;
    uint16_t h;
    if (dtype == BF16) {
        h = a > 0x7F800000u ? 0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
    } else {
        uint32_t sign = (u >> 16) & 0x8000;
        if (a > 0x7F800000u) h = 0x7E00;                             /* NaN */
        else if (a >= 0x477FF000u) h = (uint16_t)(sign | 0x7C00);    /* rounds beyond 65504: inf */
        else if (a >= 0x38800000u)                                   /* normal */
            h = (uint16_t)(sign | (((a + 0x0FFFu + ((a >> 13) & 1)) >> 13) - (112u << 10)));
        else {                                                       /* subnormal: units of 2^-24 */
            double q = (double)u2f(a) * 16777216.0;                  /* exact */
            double fl = (double)(uint32_t)q, rest = q - fl;
            uint32_t r = (uint32_t)fl + (rest > 0.5 || (rest == 0.5 && ((uint32_t)fl & 1)));
            h = (uint16_t)(sign | r);
        }
    }
    return h;
}

static inline void store(void *w, int dtype, int64_t i, float x) {
    if (dtype == F32) ((float *)w)[i] = x;
    else ((uint16_t *)w)[i] = half_bits(dtype, x);
}

/* R_D as a value: x rounded to the parameter's dtype and widened back, kept in a register. */
static inline float rnd(int dtype, float x) {
    if (dtype == F32) return x;
    uint16_t h = half_bits(dtype, x);
    return load(&h, dtype, 0);
}

static inline float decay(float s, float d) {
    if (!(s - s == 0.0f) || !(s >= 0x1p-60f || s <= -0x1p-60f)) return s; /* inf, NaN, tiny */
    float hi = u2f(f2u(s) & 0xFFFFF000u);
    float lo = s - hi;
    float t = s - d * hi;
    return t - d * lo;
}

/* Elements [start, start + n) of tensor `index` (data at w), steps first .. first + nsteps - 1.
 * mode REPLAY: P1, P2, P3 per step with c[j], d[j]; PERTURB: w += scale*z for step `first`;
 * RESTORE_UPDATE: P3 of step `first` with c[0], d[0]. */
void mezo_apply(void *w, int dtype, int64_t n, uint64_t start, uint64_t seed, uint32_t index, uint32_t first,
                int64_t nsteps, const double *c, const double *d, double eps, double scale, int noise,
                const float *table, int mode) {
    enum { CHUNK = 2048 };
    float z[CHUNK + 8];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float e = (float)eps, e2 = (float)(2.0 * eps), sc = (float)scale;
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK;
        uint64_t i0 = start + (uint64_t)base;
        for (int64_t j = 0; j < (mode == REPLAY ? nsteps : 1); j++) {
            uint32_t t = first + (uint32_t)j;
            /* noise for elements i0 .. i0+m-1: whole Philox blocks of 8, cut to the range */
            uint64_t b = i0 >> 3, last = (i0 + (uint64_t)m - 1) >> 3;
            for (; b <= last; b++) {
                uint32_t ctr[4] = {(uint32_t)b, (uint32_t)(b >> 32), index, t};
                philox(ctr, k0, k1);
                int64_t at = (int64_t)((b << 3) - i0);
                for (int q = 0; q < 8; q++) {
                    int64_t pos = at + q;
                    if (pos < 0 || pos >= m) continue;
                    uint32_t u = (ctr[q >> 1] >> (16 * (q & 1))) & 0xFFFF;
                    z[pos] = noise == GAUSSIAN16 ? table[u] : (u < 32768 ? -1.0f : 1.0f);
                }
            }
            if (mode == REPLAY) {
                float cj = (float)c[j], dj = (float)d[j];
                for (int64_t q = 0; q < m; q++) {
                    float a = e * z[q];
                    float x = rnd(dtype, load(w, dtype, base + q) + a);      /* P1 */
                    x = rnd(dtype, x - e2 * z[q]);                           /* P2 */
                    float s = x + a;                                         /* P3 */
                    if (dj != 0.0f) s = decay(s, dj);
                    store(w, dtype, base + q, s - cj * z[q]);
                }
            } else if (mode == PERTURB) {
                for (int64_t q = 0; q < m; q++)
                    store(w, dtype, base + q, load(w, dtype, base + q) + sc * z[q]);
            } else {
                float c0 = (float)c[0], d0 = (float)d[0];
                for (int64_t q = 0; q < m; q++) {
                    float s = load(w, dtype, base + q) + e * z[q];
                    if (d0 != 0.0f) s = decay(s, d0);
                    store(w, dtype, base + q, s - c0 * z[q]);
                }
            }
        }
    }
}
