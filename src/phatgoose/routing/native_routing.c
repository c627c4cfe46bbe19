/* The routed delta of a few tokens (decoding) on CPU, in one call: for each token x_t,
 *   projection  p_e = x_t . v_e                         for the E routing vectors v_e
 *   scores      s_e = p_e / (sigma_x sqrt(d_in))        PHATGOOSE (v_e stored standardised)
 *               s_e = |p_e| / temperature               Arrow
 *   the k best experts e_j, highest first; w = softmax over their k scores;
 *   out_t += sum_j w_j (A_{e_j} x_t) B_{e_j}            A (E, r, d_in), B (E, r, d_out).
 * The same computation as RoutedLinear's sparse path in torch (native.py loads this file);
 * torch's version is ten small ops per module, each microseconds of dispatch at one token.
 * Tensors are fp32 or bf16; everything is computed in fp32 and the delta is added to out once,
 * rounded once where out is bf16 (as torch adds an fp32 delta to a bf16 output).
 * Compiled by the system's C compiler for the machine it runs on (-march=native): the loops
 * below are written with independent partial sums so that it vectorises them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 32 /* partial sums per dot product: 4 AVX2 or 2 AVX-512 registers (64: no faster) */

typedef struct {
    int64_t d_in, d_out, experts, rank, k;
    const void *vectors, *A, *B;     /* (E, d_in), (E, r, d_in), (E, r, d_out) */
    int32_t vectors_bf16, stacks_bf16, arrow, unused;
    double eps, temperature;
} Params;

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, NaN kept a NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* the sum of the LANES partial sums, pairwise (a chain of LANES scalar additions, one after
 * the other, would cost more than the products of a 576-long dot product) */
static inline float reduce(float *acc) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    return acc[0];
}

static float dot_f32(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];
    return reduce(acc);
}

static float dot_bf16(const float *restrict a, const uint16_t *restrict b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * from_bf16(b[i + j]);
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * from_bf16(b[i]);
    return reduce(acc);
}

/* a . row `row` of the (rows, n) matrix m, fp32 or bf16 */
static float dot_row(const float *a, const void *m, int bf16, int64_t row, int64_t n) {
    return bf16 ? dot_bf16(a, (const uint16_t *)m + row * n, n)
                : dot_f32(a, (const float *)m + row * n, n);
}

/* y += alpha * row `row` of the (rows, n) matrix m, fp32 or bf16 */
static void axpy_row(float alpha, const void *m, int bf16, int64_t row, float *restrict y,
                     int64_t n) {
    if (bf16) {
        const uint16_t *restrict x = (const uint16_t *)m + row * n;
        for (int64_t i = 0; i < n; i++) y[i] += alpha * from_bf16(x[i]);
    } else {
        const float *restrict x = (const float *)m + row * n;
        for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
    }
}

/* 1 / sqrt(var(x) + eps), the biased variance as LayerNorm takes it, in double, each sum
 * in 8 partial sums (independent additions, which the compiler vectorises). */
static double inverse_sigma(const float *x, int64_t n, double eps) {
    double sums[8] = {0}, mean = 0, var = 0;
    for (int64_t i = 0; i < n; i++) sums[i % 8] += x[i];
    for (int j = 0; j < 8; j++) mean += sums[j], sums[j] = 0;
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) sums[i % 8] += (x[i] - mean) * (x[i] - mean);
    for (int j = 0; j < 8; j++) var += sums[j];
    return 1.0 / sqrt(var / (double)n + eps);
}

/* Route token t of x (fp32, d_in) given its projection st (E, scaled in place): out row t +=
 * its delta. chosen, weights (k) and delta (d_out) are the caller's scratch. */
static void route_token(int64_t t, const float *xt, float *st, void *out, int32_t out_bf16,
                        const Params *p, int64_t *chosen, float *weights, float *delta) {
    const int64_t d_in = p->d_in, d_out = p->d_out, E = p->experts, r = p->rank, k = p->k;
    double scale = p->arrow ? 1.0 / p->temperature
                            : inverse_sigma(xt, d_in, p->eps) / sqrt((double)d_in);
    for (int64_t e = 0; e < E; e++) st[e] = (float)((p->arrow ? fabsf(st[e]) : st[e]) * scale);
    /* k passes of max, each over the experts not chosen yet; ties go to the lower index, and
     * a NaN score is never preferred (but an expert is always chosen) */
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || st[e] > st[best])) best = e;
        }
        chosen[j] = best;
    }
    double total = 0;
    for (int64_t j = 0; j < k; j++) total += exp((double)st[chosen[j]] - st[chosen[0]]);
    for (int64_t j = 0; j < k; j++)
        weights[j] = (float)(exp((double)st[chosen[j]] - st[chosen[0]]) / total);
    memset(delta, 0, sizeof(float) * (size_t)d_out);
    for (int64_t j = 0; j < k; j++)
        for (int64_t i = 0; i < r; i++) {
            int64_t row = chosen[j] * r + i;
            float hidden = dot_row(xt, p->A, p->stacks_bf16, row, d_in);
            axpy_row(weights[j] * hidden, p->B, p->stacks_bf16, row, delta, d_out);
        }
    if (out_bf16) {
        uint16_t *yt = (uint16_t *)out + t * d_out;
        for (int64_t i = 0; i < d_out; i++) yt[i] = to_bf16(from_bf16(yt[i]) + delta[i]);
    } else {
        float *yt = (float *)out + t * d_out;
        for (int64_t i = 0; i < d_out; i++) yt[i] += delta[i];
    }
}

/* Below this many multiply-adds a loop runs on one thread (a parallel region costs µs). */
#define PARALLEL_MIN 16384

/* out (n, d_out) += the routed delta of x (n, d_in), each fp32 or bf16 (x_bf16, out_bf16).
 * The projection runs expert by expert over all n tokens, so that each routing vector is read
 * from memory once per call, not once per token; with OpenMP (the one torch loaded, so the
 * same threads), the experts are split among the threads, then the tokens. Returns 0, or 1
 * if it could not allocate its scratch (out untouched then). */
int routed_delta(int64_t n, const void *x, int32_t x_bf16, void *out, int32_t out_bf16,
                 const Params *p) {
    const int64_t d_in = p->d_in, d_out = p->d_out, E = p->experts, k = p->k;
    const int64_t per_token = E + d_out + k; /* scratch per token: scores, delta, weights */
    float *scratch = malloc(sizeof(float) * (size_t)(n * per_token + (x_bf16 ? n * d_in : 0)));
    int64_t *chosen = malloc(sizeof(int64_t) * (size_t)(n * k));
    if (!scratch || !chosen) {
        free(scratch), free(chosen);
        return 1;
    }
    float *xf = scratch + n * per_token;
    if (x_bf16)
        for (int64_t i = 0; i < n * d_in; i++) xf[i] = from_bf16(((const uint16_t *)x)[i]);
    else
        xf = (float *)x;
#pragma omp parallel for schedule(static) if (n * E * d_in >= PARALLEL_MIN)
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < n; t++)
            scratch[t * per_token + e] = dot_row(xf + t * d_in, p->vectors, p->vectors_bf16, e,
                                                 d_in);
#pragma omp parallel for schedule(static) if (n > 1 && n * k * p->rank * (d_in + d_out) >= PARALLEL_MIN)
    for (int64_t t = 0; t < n; t++) {
        float *st = scratch + t * per_token, *delta = st + E, *weights = delta + d_out;
        route_token(t, xf + t * d_in, st, out, out_bf16, p, chosen + t * k, weights, delta);
    }
    free(scratch), free(chosen);
    return 0;
}
