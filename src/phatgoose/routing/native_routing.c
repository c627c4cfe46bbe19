/* The routed delta of a few tokens (decoding) on CPU, in fp32, in one call: for each token x_t,
 *   projection  p_e = x_t . v_e                         for the E routing vectors v_e
 *   scores      s_e = p_e / (sigma_x sqrt(d_in))        PHATGOOSE (v_e stored standardised)
 *               s_e = |p_e| / temperature               Arrow
 *   the k best experts e_j, highest first; w = softmax over their k scores;
 *   out_t += sum_j w_j (A_{e_j} x_t) B_{e_j}            A (E, r, d_in), B (E, r, d_out).
 * The same computation as RoutedLinear's sparse path in torch (native.py loads this file);
 * torch's version is ten small ops per module, each microseconds of dispatch at one token.
 * Compiled by the system's C compiler for the machine it runs on (-march=native): the loops
 * below are written with independent partial sums so that it vectorises them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 32 /* partial sums per dot product: 4 AVX2 or 2 AVX-512 registers */

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    float sum = 0;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < LANES; j++) sum += acc[j];
    return sum;
}

static void axpy(float alpha, const float *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* 1 / sqrt(var(x) + eps), the biased variance as LayerNorm takes it, in double. */
static double inverse_sigma(const float *x, int64_t n, double eps) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    return 1.0 / sqrt(var / (double)n + eps);
}

/* Returns 0, or 1 if it could not allocate its scratch (out untouched then). */
int routed_delta_f32(int64_t n, int64_t d_in, int64_t d_out, int64_t experts, int64_t rank,
                     int64_t k, const float *x, float *out, const float *vectors,
                     const float *A, const float *B, int arrow, double eps,
                     double temperature) {
    float *scores = malloc(sizeof(float) * (size_t)experts);
    int64_t *chosen = malloc(sizeof(int64_t) * (size_t)k);
    float *weights = malloc(sizeof(float) * (size_t)k);
    if (!scores || !chosen || !weights) {
        free(scores), free(chosen), free(weights);
        return 1;
    }
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * d_in;
        float *yt = out + t * d_out;
        double scale = arrow ? 1.0 / temperature
                             : inverse_sigma(xt, d_in, eps) / sqrt((double)d_in);
        for (int64_t e = 0; e < experts; e++) {
            float p = dot(xt, vectors + e * d_in, d_in);
            scores[e] = (float)((arrow ? fabsf(p) : p) * scale);
        }
        /* k passes of max, each over the experts not chosen yet; ties go to the lower index,
         * and a NaN score is never preferred (but an expert is always chosen) */
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
                if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
            }
            chosen[j] = best;
        }
        double total = 0;
        for (int64_t j = 0; j < k; j++) total += exp((double)scores[chosen[j]] - scores[chosen[0]]);
        for (int64_t j = 0; j < k; j++)
            weights[j] = (float)(exp((double)scores[chosen[j]] - scores[chosen[0]]) / total);
        for (int64_t j = 0; j < k; j++) {
            const float *Ae = A + chosen[j] * rank * d_in, *Be = B + chosen[j] * rank * d_out;
            for (int64_t i = 0; i < rank; i++)
                axpy(weights[j] * dot(xt, Ae + i * d_in, d_in), Be + i * d_out, yt, d_out);
        }
    }
    free(scores), free(chosen), free(weights);
    return 0;
}
