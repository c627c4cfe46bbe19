/* The routed delta on CPU. routed_delta: a few tokens (decoding), in one call: for each x_t,
 *   projection  p_e = x_t . v_e                         for the E routing vectors v_e
 *   scores      s_e = p_e / (sigma_x sqrt(d_in))        PHATGOOSE (v_e stored standardised)
 *               s_e = |p_e| / temperature               Arrow
 *   the k best experts e_j, highest first; w = softmax over their k scores;
 *   out_t += sum_j w_j (A_{e_j} x_t) B_{e_j}            A (E, r, d_in), B (E, r, d_out).
 * The same computation as RoutedLinear's sparse path in torch (native.py loads this file);
 * torch's version is ten small ops per module, each microseconds of dispatch at one token.
 * Tensors are fp32 or bf16; everything is computed in fp32 and the delta is added to out once,
 * rounded once where out is bf16 (as torch adds an fp32 delta to a bf16 output).
 * chosen_delta: many tokens (prefill), fp32, the delta alone, of experts chosen in torch.
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

/* y[0:len] += alpha * x[0:len] */
static void axpy(float alpha, const float *restrict x, float *restrict y, int64_t len) {
    for (int64_t i = 0; i < len; i++) y[i] += alpha * x[i];
}

/* y += alpha * row `row` of the (rows, n) matrix m, fp32 or bf16 */
static void axpy_row(float alpha, const void *m, int bf16, int64_t row, float *restrict y,
                     int64_t n) {
    if (bf16) {
        const uint16_t *restrict x = (const uint16_t *)m + row * n;
        for (int64_t i = 0; i < n; i++) y[i] += alpha * from_bf16(x[i]);
    } else {
        axpy(alpha, (const float *)m + row * n, y, n);
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

/* eight fp32 lanes (GCC and Clang vector extensions: AVX2 registers here, two NEON ones on ARM) */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* res[i] = x . a[i * n : (i + 1) * n] for the 8 rows i of a, x's loads shared among them */
static void dot8_rows(const float *restrict x, const float *restrict a, int64_t n,
                      float *restrict res) {
    v8 s[8] = {{0}};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const v8 xv = load8(x + c);
        for (int i = 0; i < 8; i++) s[i] += xv * load8(a + i * n + c);
    }
    for (int i = 0; i < 8; i++) {
        res[i] = sum8(s[i]);
        for (int64_t j = c; j < n; j++) res[i] += x[j] * a[i * n + j];
    }
}

/* columns of out per block in chosen_delta: 32 floats, 4 registers of sums. 64 ran slower where
 * d_out = 1536: the block's E r rows of B, 6 KiB apart, then fall into too few L2 cache sets */
#define COLUMNS 32

/* out (n, d_out) += sum_j w_tj (A_{e_tj} x_t) B_{e_tj}: the delta of experts already chosen
 * (experts, weights: (n, k)), for many tokens (prefill); x, out and the stacks fp32. Two passes,
 * each split among the threads. First the pairs' hidden units h_tj = w_tj A_e x_t, the (token,
 * slot) pairs grouped by expert (a counting sort), so that A_e stays in cache while its pairs
 * use it. Then out_t += sum_j h_tj B_e in blocks of COLUMNS columns, token by token within a
 * block: that block of every expert's B (E r COLUMNS values) stays in the L2 cache while the
 * tokens stream past, each token's COLUMNS sums stay in registers, and each row of out is read
 * and written once. The delta is computed in fp32 and added once. Returns 0, or 1 if it could
 * not allocate its scratch (out untouched then). */
int chosen_delta(int64_t n, const float *x, float *out, const int64_t *experts,
                 const float *weights, const Params *p) {
    const int64_t d_in = p->d_in, d_out = p->d_out, E = p->experts, r = p->rank, k = p->k;
    const int64_t pairs = n * k;
    const float *A = (const float *)p->A, *B = (const float *)p->B;
    int64_t *start = calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(pairs + E + 1));
    float *hidden = malloc(sizeof(float) * (size_t)(pairs * r + 1));
    if (!start || !order || !hidden) {
        free(start), free(order), free(hidden);
        return 1;
    }
    int64_t *next = order + pairs;
    for (int64_t q = 0; q < pairs; q++) start[experts[q] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(next, start, sizeof(int64_t) * (size_t)E);
    for (int64_t q = 0; q < pairs; q++) order[next[experts[q]]++] = q;
#pragma omp parallel for schedule(dynamic, 1) if (pairs * r * d_in >= PARALLEL_MIN)
    for (int64_t e = 0; e < E; e++)
        for (int64_t s = start[e]; s < start[e + 1]; s++) {
            const int64_t q = order[s], t = q / k;
            float *h = hidden + q * r;
            int64_t i = 0;
            for (; i + 8 <= r; i += 8) dot8_rows(x + t * d_in, A + (e * r + i) * d_in, d_in, h + i);
            for (; i < r; i++) h[i] = dot_f32(x + t * d_in, A + (e * r + i) * d_in, d_in);
            for (i = 0; i < r; i++) h[i] *= weights[q];
        }
    const int64_t blocks = (d_out + COLUMNS - 1) / COLUMNS;
#pragma omp parallel for schedule(static) if (pairs * r * d_out >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t c0 = b * COLUMNS;
        for (int64_t t = 0; t < n; t++) {
            float *yt = out + t * d_out + c0;
            if (c0 + COLUMNS <= d_out) {
                v8 acc[COLUMNS / 8] = {{0}};
                for (int64_t q = t * k; q < (t + 1) * k; q++)
                    for (int64_t i = 0; i < r; i++) {
                        const v8 h = (v8){0} + hidden[q * r + i];
                        const float *row = B + (experts[q] * r + i) * d_out + c0;
                        for (int c = 0; c < COLUMNS / 8; c++) acc[c] += h * load8(row + 8 * c);
                    }
                for (int c = 0; c < COLUMNS / 8; c++) {
                    v8 y = load8(yt + 8 * c) + acc[c];
                    memcpy(yt + 8 * c, &y, sizeof y);
                }
            } else { /* the last, narrower block */
                float acc[COLUMNS] = {0};
                const int64_t width = d_out - c0;
                for (int64_t q = t * k; q < (t + 1) * k; q++)
                    for (int64_t i = 0; i < r; i++)
                        axpy(hidden[q * r + i], B + (experts[q] * r + i) * d_out + c0, acc,
                             width);
                for (int64_t c = 0; c < width; c++) yt[c] += acc[c];
            }
        }
    }
    free(start), free(order), free(hidden);
    return 0;
}
