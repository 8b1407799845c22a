/* Crossbar reads of binary input bit planes by table lookup (the "four Russians" method): nipa's CPU kernel.

   The partial sum of one read is P[z, r, c] = sum_s sign[r, s] * bit_z(mag[r, s]) * cells[s, c] over the
   rows s of one tile. Every input row is 0 or +-1, so a group of 4 rows can only select one of 16 sums of
   their cells. The kernel tabulates those 16 sums per group once per (tile, block of columns); a partial
   sum is then one table row per group whose input bits are not all zero (32 vector additions for 128
   rows instead of 128 multiply-adds, fewer where the planes are sparse: high bits, ReLU zeros). Negative
   inputs subtract the table row of their rows. Each output is summed by one thread in one fixed order, so
   results do not depend on threads or chunking; with integer cells every sum is an exact integer.

   Three modes per call:
     SUMS    write the partial sums, out[z, r, c];
     RANGE   only their minimum and maximum per (bit, slice), range_out[z, k, 2] (a dynamic ADC's range);
     READ    the ADC read of each partial sum, weighted and summed over the slices, added to
             out[z, r, o] (the columns in vector-slice order, see plane_lookup below):
               index = min(max(round_half_even((P - lo[z, k]) / divisor[z, k]), 0), levels)
               out[z, r, o] += coefficient[z, k] * index        (slices in increasing k)
             the same operations in the same order as nipa.simulator.crossbar._quantize_reads.
   RANGE and READ never write the partial sums to memory, which is where most of the time of a
   materialized product goes.

   Compiled at first use by nipa/simulator/plane_lookup.py (cc -O3 -march=native, no fast-math: the
   rounding below relies on IEEE arithmetic); GCC vector types keep the accumulators in registers on any
   instruction set. */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#define GROUP 4
#define PATTERNS 16
#define MODE_SUMS 0
#define MODE_RANGE 1
#define MODE_READ 2
typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t mask16 __attribute__((vector_size(64)));

/* Lane-wise mask ? a : b (C has no vector ternary). */
static inline vec16 lanes_select(mask16 mask, vec16 a, vec16 b) { return (vec16)((mask & (mask16)a) | (~mask & (mask16)b)); }

#ifdef __AVX512F__
static inline vec16 vmin(vec16 a, vec16 b) { return (vec16)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vec16 vmax(vec16 a, vec16 b) { return (vec16)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline vec16 vmin(vec16 a, vec16 b) { return lanes_select(a < b, a, b); }
static inline vec16 vmax(vec16 a, vec16 b) { return lanes_select(a > b, a, b); }
#endif

/* The low bit of each of the 4 bytes of w, packed into 4 bits (byte k -> bit k). */
static inline uint32_t low_bits(uint32_t w) { return (((w & 0x01010101u) * 0x01020408u) >> 24) & 0xFu; }

static inline uint32_t load_group(const uint8_t* p, long count) {
    uint32_t w = 0;
    if (count == GROUP) { memcpy(&w, p, GROUP); return w; }
    for (long k = 0; k < count; ++k) w |= (uint32_t)p[k] << (8 * k);
    return w;
}

/* Round half to even (torch.round). The generic form is exact for |x| < 2^22 under IEEE
   round-to-nearest; larger values keep their sign and stay beyond any ADC level, so the clamp that
   follows gives the same index. */
static inline vec16 round_even(vec16 x) {
#ifdef __AVX512F__
    return (vec16)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const vec16 magic = (vec16){0} + 12582912.0f; /* 1.5 * 2^23 */
    vec16 big = (vec16){0} + 4194304.0f;          /* 2^22 */
    vec16 r = (x + magic) - magic;
    return lanes_select((x >= big) | (x <= -big), x, r);
#endif
}

/* table[g][p][0:width] = sum of the cells of the rows of group g whose bit is set in p; columns past
   `used` are zero. */
static void build_table(const float* cols, long C, long rows, long c0, long used, long width,
                        long groups, float* table) {
    for (long g = 0; g < groups; ++g) {
        float* tg = table + g * PATTERNS * width;
        memset(tg, 0, sizeof(float) * width);
        for (int p = 1; p < PATTERNS; ++p) {
            int top = 31 - __builtin_clz((unsigned)p);
            long row = g * GROUP + top;
            float* dst = tg + p * width;
            const float* src = tg + (p & ~(1 << top)) * width;
            if (row < rows) {
                const float* w = cols + row * C + c0;
                for (long j = 0; j < used; ++j) dst[j] = src[j] + w[j];
                for (long j = used; j < width; ++j) dst[j] = 0.f;
            } else {
                memcpy(dst, src, sizeof(float) * width);
            }
        }
    }
}

/* For each read (bit z, row r) of rows [r0, r1), read index z * (r1 - r0) + (r - r0): the table rows it
   adds (`plus`) and subtracts (`minus`), as float offsets into a table of `width` columns, and their
   counts. Computed once per block of rows, reused by every block of columns. */
#ifdef __AVX512BW__
/* The entries of one plane's set rows, 64 rows at a time: bit j of `set` is row 64 c + j, so each
   nibble is one group's pattern; the groups with a pattern follow in increasing order. */
static inline int emit(uint64_t set, long first_group, long width, int32_t* list, int count) {
    uint64_t any = (set | (set >> 1) | (set >> 2) | (set >> 3)) & 0x1111111111111111ull;
    while (any) {
        int bit = __builtin_ctzll(any);
        list[count++] = (int32_t)(((first_group + bit / 4) * PATTERNS + ((set >> bit) & 0xF)) * width);
        any &= any - 1;
    }
    return count;
}
#endif

static void list_reads(const uint8_t* mag, const int8_t* sign, long row_stride, long S, long groups, long r0,
                       long r1, long z0, long Z, long width, int32_t* plus, int32_t* minus, int32_t* counts) {
    long rows = r1 - r0;
#ifdef __AVX512BW__
    /* Bit tests of 64 input rows at once (AVX-512BW): the same entries in the same order as below. */
    for (long r = r0; r < r1; ++r) {
        const uint8_t* m = mag + r * row_stride;
        const int8_t* sg = sign + r * row_stride;
        int np[64], nq[64];
        for (long z = 0; z < Z; ++z) np[z] = nq[z] = 0;
        for (long c0 = 0; c0 < S; c0 += 64) {
            __mmask64 lanes = S - c0 >= 64 ? ~0ull : (1ull << (S - c0)) - 1;
            __m512i values = _mm512_maskz_loadu_epi8(lanes, m + c0);
            uint64_t negative = _mm512_movepi8_mask(_mm512_maskz_loadu_epi8(lanes, sg + c0));
            for (long z = 0; z < Z; ++z) {
                uint64_t set = _mm512_test_epi8_mask(values, _mm512_set1_epi8((char)(1 << (z0 + z))));
                if (!set) continue;
                long read = z * rows + (r - r0);
                np[z] = emit(set & ~negative, c0 / GROUP, width, plus + read * groups, np[z]);
                nq[z] = emit(set & negative, c0 / GROUP, width, minus + read * groups, nq[z]);
            }
        }
        for (long z = 0; z < Z; ++z) {
            long read = z * rows + (r - r0);
            counts[2 * read] = np[z];
            counts[2 * read + 1] = nq[z];
        }
    }
#else
    for (long r = r0; r < r1; ++r) {
        const uint8_t* m = mag + r * row_stride;
        const int8_t* sg = sign + r * row_stride;
        int np[64], nq[64]; /* per bit; Z <= 63 */
        for (long z = 0; z < Z; ++z) np[z] = nq[z] = 0;
        for (long g = 0; g < groups; ++g) {
            long base = g * GROUP, count = S - base < GROUP ? S - base : GROUP;
            uint32_t word = load_group(m + base, count) >> z0;
            if (!word) continue; /* no set bit in any plane (ReLU zeros, small values) */
            uint32_t negative_rows = low_bits(load_group((const uint8_t*)sg + base, count) >> 7);
            int32_t offset = (int32_t)(g * PATTERNS * width);
            for (long z = 0; z < Z; ++z) {
                uint32_t set = low_bits(word >> z);
                uint32_t negative = set & negative_rows, positive = set & ~negative_rows;
                long read = z * rows + (r - r0);
                plus[read * groups + np[z]] = offset + (int32_t)(positive * width);
                np[z] += positive != 0;
                minus[read * groups + nq[z]] = offset + (int32_t)(negative * width);
                nq[z] += negative != 0;
            }
        }
        for (long z = 0; z < Z; ++z) {
            long read = z * rows + (r - r0);
            counts[2 * read] = np[z];
            counts[2 * read + 1] = nq[z];
        }
    }
#endif
}

typedef struct {
    long Z, rows, C, c0, used, out_row0, out_bit_stride, r0;
    int mode;
    long slices;        /* RANGE, READ: K; the columns hold vector v = 16 outputs of slice v % K, block v / K */
    long out_features;  /* RANGE, READ: real outputs (the last block's lanes past it are padding) */
    const float* adc;   /* READ: [Z, K, 3] (lo, divisor, coefficient) */
    float levels;
    float* out;
    float* range_out;   /* RANGE: [Z, K, 2] (min, max), folded into */
} block_args;

#define DEFINE_BLOCK(V)                                                                                      \
    static void block_##V(const int32_t* plus, const int32_t* minus, const int32_t* counts, long groups,    \
                          const float* table, const block_args* a) {                                      \
        long first = a->c0 / 16, vectors = a->used / 16; /* RANGE, READ: whole vectors */                   \
        long K = a->slices;                                                                                 \
        long padded = (a->C / 16 / (K > 0 ? K : 1)) * 16; /* READ: outputs per row, padded to 16 */         \
        long block_of[V];                                                                                   \
        for (int j = 0; j < V; ++j) block_of[j] = K > 0 ? (first + j) / K : 0;                              \
        for (long z = 0; z < a->Z; ++z) {                                                                   \
            vec16 lo[V], divisor[V], coefficient[V], low[V], high[V];                                        \
            _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) {                                           \
                low[j] = (vec16){0} + INFINITY; high[j] = (vec16){0} - INFINITY;                             \
                lo[j] = (vec16){0}; divisor[j] = (vec16){0} + 1.f; coefficient[j] = (vec16){0};              \
            }                                                                                                \
            if (a->mode == MODE_READ)                                                                        \
                for (long j = 0; j < vectors; ++j) {                                                         \
                    const float* p = a->adc + (z * K + (first + j) % K) * 3;                                 \
                    lo[j] = (vec16){0} + p[0]; divisor[j] = (vec16){0} + p[1]; coefficient[j] = (vec16){0} + p[2]; \
                }                                                                                            \
            for (long r = 0; r < a->rows; ++r) {                                                            \
                long read = z * a->rows + r;                                                                 \
                vec16 acc[V];                                                                                \
                _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) acc[j] = (vec16){0};                    \
                const int32_t* p = plus + read * groups;                                                     \
                for (int i = 0; i < counts[2 * read]; ++i) {                                                 \
                    const vec16* e = (const vec16*)(table + p[i]);                                           \
                    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) acc[j] += e[j];                     \
                }                                                                                            \
                const int32_t* q = minus + read * groups;                                                    \
                for (int i = 0; i < counts[2 * read + 1]; ++i) {                                             \
                    const vec16* e = (const vec16*)(table + q[i]);                                           \
                    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) acc[j] -= e[j];                     \
                }                                                                                            \
                long row = a->r0 + r - a->out_row0;                                                          \
                if (a->mode == MODE_SUMS) {                                                                  \
                    memcpy(a->out + z * a->out_bit_stride + row * a->C + a->c0, acc, sizeof(float) * a->used); \
                } else if (a->mode == MODE_RANGE) {                                                          \
                    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) {                                   \
                        low[j] = vmin(acc[j], low[j]);                                                       \
                        high[j] = vmax(acc[j], high[j]);                                                     \
                    }                                                                                        \
                } else {                                                                                     \
                    vec16* o = (vec16*)(a->out + z * a->out_bit_stride + row * padded);                      \
                    /* The K slices of a block of outputs are consecutive vectors: add them in a register */ \
                    /* (the same order as adding each to memory). */                                         \
                    long current = block_of[0];                                                              \
                    vec16 sum = o[current];                                                                  \
                    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) {                                   \
                        if (j >= vectors) break;                                                             \
                        if (block_of[j] != current) { o[current] = sum; current = block_of[j]; sum = o[current]; } \
                        vec16 index = round_even((acc[j] - lo[j]) / divisor[j]);                             \
                        index = vmin(vmax(index, (vec16){0}), (vec16){0} + a->levels);                       \
                        sum += index * coefficient[j];                                                       \
                    }                                                                                        \
                    o[current] = sum;                                                                        \
                }                                                                                            \
            }                                                                                                \
            if (a->mode == MODE_RANGE)                                                                       \
                for (long j = 0; j < vectors; ++j) {                                                         \
                    long v = first + j, k = v % K, block = v / K;                                            \
                    long lanes = a->out_features - 16 * block < 16 ? a->out_features - 16 * block : 16;      \
                    float* range = a->range_out + (z * K + k) * 2;                                           \
                    for (long lane = 0; lane < lanes; ++lane) {                                              \
                        if (low[j][lane] < range[0]) range[0] = low[j][lane];                                \
                        if (high[j][lane] > range[1]) range[1] = high[j][lane];                              \
                    }                                                                                        \
                }                                                                                            \
        }                                                                                                    \
    }

DEFINE_BLOCK(2)
DEFINE_BLOCK(4)
DEFINE_BLOCK(8)
DEFINE_BLOCK(16)

/* One task: input rows [r0, r1) of one tile, every column, bits z0 .. z0 + Z - 1.
   mag, sign: the tile's inputs, row r at mag + r * row_stride (S values); cols: the tile's cells [S, C];
   rows: the tile's rows that hold cells (a short last tile). SUMS: any C columns, out [Z, *, C].
   RANGE, READ: the columns in vector-slice order, C = K * 16 * blocks, vector v holding 16 outputs of
   slice v % K (outputs 16 (v / K) ...), zero cells for padding outputs >= out_features; READ writes out
   [Z, *, 16 * blocks]; RANGE folds into range_out [Z, K, 2] (start at +inf, -inf).
   Row r of out at r - out_row0, out_bit_stride floats between bits. table: scratch of ceil(C / (16
   vectors)) * ceil(S / 4) * 16 * 16 vectors floats, 64-byte aligned; lists: row_block * Z * (2 ceil(S / 4)
   + 2) ints, the read lists of row_block rows at a time (every block of columns reuses them). Returns 0, or -1 for an unsupported block width or a column count the mode cannot take. */
int plane_lookup(const uint8_t* mag, const int8_t* sign, long row_stride, const float* cols, long S, long C,
                 long rows, long r0, long r1, long out_row0, long z0, long Z, float* out, long out_bit_stride,
                 int vectors, float* table, int32_t* lists, long row_block, int mode, long slices,
                 long out_features, const float* adc, float levels, float* range_out) {
    long groups = (S + GROUP - 1) / GROUP;
    long width = 16L * vectors;
    long ncb = (C + width - 1) / width;
    long table_floats = groups * PATTERNS * width;
    int32_t* plus = lists;
    int32_t* minus = plus + row_block * Z * groups;
    int32_t* counts = minus + row_block * Z * groups;
    if (vectors != 2 && vectors != 4 && vectors != 8 && vectors != 16) return -1;
    if (Z < 1 || Z > 63 || z0 < 0 || z0 + Z > 8 || row_block < 1) return -1;
    if (mode != MODE_SUMS && (slices <= 0 || C % (16 * slices) != 0 || out_features > C / slices)) return -1;
    for (long cb = 0; cb < ncb; ++cb) {
        long c0 = cb * width, used = C - c0 < width ? C - c0 : width;
        build_table(cols, C, rows, c0, used, width, groups, table + cb * table_floats);
    }
    long padded = mode == MODE_READ ? C / slices : 0;
    for (long b0 = r0; b0 < r1; b0 += row_block) {
        long b1 = b0 + row_block < r1 ? b0 + row_block : r1;
        list_reads(mag, sign, row_stride, S, groups, b0, b1, z0, Z, width, plus, minus, counts);
        if (mode == MODE_READ) /* the block's outputs start at zero, in cache */
            for (long z = 0; z < Z; ++z)
                memset(out + z * out_bit_stride + (b0 - out_row0) * padded, 0, sizeof(float) * (b1 - b0) * padded);
        for (long cb = 0; cb < ncb; ++cb) {
            long c0 = cb * width, used = C - c0 < width ? C - c0 : width;
            block_args a = {Z, b1 - b0, C, c0, used, out_row0, out_bit_stride, b0, mode, slices, out_features,
                            adc, levels, out, range_out};
            const float* tc = table + cb * table_floats;
            switch (vectors) {
                case 2: block_2(plus, minus, counts, groups, tc, &a); break;
                case 4: block_4(plus, minus, counts, groups, tc, &a); break;
                case 8: block_8(plus, minus, counts, groups, tc, &a); break;
                default: block_16(plus, minus, counts, groups, tc, &a); break;
            }
        }
    }
    return 0;
}

/* The shift and add of one block of rows, in forward's order (bits outer, tiles inner):
     out[r, o] += (reads[t, z, r, o] + constant[t, z]) * scale[t, o]   for z = 0 .. Z-1, t = 0 .. T-1,
   each step one addition and one fused multiply-add (as torch's add_ and addcmul_ round), for rows
   [r0, r1) of reads [T, Z, rows, padded] and out [rows, out_features]. One pass over the reads with each
   output row in cache, instead of T * Z passes over the output. */
void shift_add(const float* reads, const float* constant, const float* scale, float* out, long T, long Z,
               long rows, long padded, long out_features, long r0, long r1) {
    /* Blocks of rows whose outputs fill 64 KB (in cache while every (bit, tile) is added): each (bit,
       tile) then reads one contiguous run of the reads. */
    long block = 16384 / (out_features > 0 ? out_features : 1);
    if (block < 1) block = 1;
    for (long b0 = r0; b0 < r1; b0 += block) {
        long b1 = b0 + block < r1 ? b0 + block : r1;
        for (long z = 0; z < Z; ++z)
            for (long t = 0; t < T; ++t) {
                const float* weight = scale + t * out_features;
                float c = constant[t * Z + z];
                for (long r = b0; r < b1; ++r) {
                    const float* src = reads + ((t * Z + z) * rows + r) * padded;
                    float* o = out + r * out_features;
                    for (long j = 0; j < out_features; ++j) o[j] = __builtin_fmaf(src[j] + c, weight[j], o[j]);
                }
            }
    }
}
