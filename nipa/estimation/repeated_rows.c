/* The repeated form's error of a convolution in one pass (nipa's CPU kernel for
   nipa.estimation.inject._InjectedLayer._repeated_error).

   Per output position of images [n0, n1): the integer levels of its input patch (round(x / scale), zero
   outside the image, as the crossbar's padded rows), their two hashes sum_i level_i * weight_i in exact
   64-bit integers, the known repeated row with both hashes equal (or none), and per output channel
       y[o, p] += error[m, o]               where the patch is repeated row m,
       y[o, p] += noise[o, p] * std[o]      elsewhere (one rounding, as torch's addcmul),
   the same values as the PyTorch path (whose float hashes are exact integers too).
   Compiled at first use by nipa/native.py (cc -O3 -march=native -ffp-contract=off). */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>

/* The first output column ow of a row whose input column ow * stride - pad + offset is inside [0, width),
   and one past the last. */
static void inside(long offset, long stride, long pad, long width, long out_w, long *first, long *stop) {
    long lo = pad - offset, hi = width - 1 + pad - offset; /* ow * stride in [lo, hi] */
    long a = lo <= 0 ? 0 : (lo + stride - 1) / stride;
    long b = hi < 0 ? -1 : hi / stride;
    *first = a;
    *stop = b + 1 < out_w ? b + 1 : out_w;
    if (*stop < *first) *stop = *first;
}

int repeated_conv_error(const float *x, float scale, long channels, long height, long width,
                        long kernel_h, long kernel_w, long stride_h, long stride_w, long pad_top, long pad_left,
                        long dilation_h, long dilation_w, long out_h, long out_w,
                        const int64_t *hash_weights, const int64_t *known, long rows,
                        const float *errors, const float *std, const float *noise, float *y, long out_channels,
                        long n0, long n1, int32_t *levels, int32_t *index, int64_t *hashes) {
    const long plane = height * width, positions = out_h * out_w;
    const long fan_in = channels * kernel_h * kernel_w;
    if (rows <= 0 || rows > 31 || fan_in <= 0 || out_w <= 0) return 1;
    int64_t *first = hashes, *second = hashes + out_w;
    for (long n = n0; n < n1; n++) {
        const float *image = x + n * channels * plane;
        for (long i = 0; i < channels * plane; i++) levels[i] = (int32_t)rintf(image[i] / scale);
        for (long oh = 0; oh < out_h; oh++) {
            for (long ow = 0; ow < out_w; ow++) first[ow] = second[ow] = 0;
            for (long c = 0; c < channels; c++) {
                for (long kh = 0; kh < kernel_h; kh++) {
                    const long ih = oh * stride_h - pad_top + kh * dilation_h;
                    if (ih < 0 || ih >= height) continue; /* a zero-padded row adds nothing */
                    const int32_t *line = levels + c * plane + ih * width;
                    for (long kw = 0; kw < kernel_w; kw++) {
                        const long tap = (c * kernel_h + kh) * kernel_w + kw;
                        const int64_t w1 = hash_weights[tap], w2 = hash_weights[fan_in + tap];
                        const long offset = kw * dilation_w - pad_left;
                        long start, stop;
                        inside(kw * dilation_w, stride_w, pad_left, width, out_w, &start, &stop);
                        for (long ow = start; ow < stop; ow++) {
                            const int64_t level = line[ow * stride_w + offset];
                            first[ow] += level * w1;
                            second[ow] += level * w2;
                        }
                    }
                }
            }
            int32_t *row_index = index + oh * out_w;
            for (long ow = 0; ow < out_w; ow++) row_index[ow] = (int32_t)rows; /* the other rows' entry */
            for (long m = rows - 1; m >= 0; m--) { /* the first known row that matches */
                const int64_t k1 = known[2 * m], k2 = known[2 * m + 1];
                for (long ow = 0; ow < out_w; ow++)
                    row_index[ow] = first[ow] == k1 && second[ow] == k2 ? (int32_t)m : row_index[ow];
            }
        }
        for (long o = 0; o < out_channels; o++) {
            float *out = y + (n * out_channels + o) * positions;
            const float *normal = noise + (n * out_channels + o) * positions;
            const float deviation = std[o];
            float table[32] = {0}; /* this channel's errors; entry `rows` (the other rows) stays 0 */
            for (long m = 0; m < rows; m++) table[m] = errors[m * out_channels + o];
            /* A repeated row: out + error (its normal times 0 adds nothing); any other: fma(normal, std, out),
               rounded once as torch's addcmul. */
            long p = 0;
#ifdef __AVX512F__
            /* The table in two registers: a lookup is one two-register permutation (rows <= 31). */
            const __m512 low = _mm512_loadu_ps(table), high = _mm512_loadu_ps(table + 16);
            const __m512i other = _mm512_set1_epi32((int32_t)rows);
            const __m512 spread = _mm512_set1_ps(deviation);
            for (; p + 16 <= positions; p += 16) {
                const __m512i m = _mm512_loadu_si512(index + p);
                const __m512 error = _mm512_permutex2var_ps(low, m, high);
                const __mmask16 keep = _mm512_cmpeq_epi32_mask(m, other);
                const __m512 gaussian = _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(normal + p));
                const __m512 value = _mm512_add_ps(_mm512_loadu_ps(out + p), error);
                _mm512_storeu_ps(out + p, _mm512_fmadd_ps(gaussian, spread, value));
            }
#endif
            for (; p < positions; p++) {
                const int32_t m = index[p];
                const float keep = m == rows ? 1.0f : 0.0f;
                out[p] = fmaf(normal[p] * keep, deviation, out[p] + table[m]);
            }
        }
    }
    return 0;
}
