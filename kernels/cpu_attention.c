/* One decode query per head over a float16 context, as two ggml custom ops (edgectx.kernels.cpu_attention).
 *
 * ggml's flash attention walks the keys one at a time per query head (a dot product, an expf and a row update
 * per key and head): about 20 ns a key and head on this kind of CPU, whatever the K/V type. Here each KV head's
 * keys are read once for every query head of its group, 64 keys at a time: the block's K rows widened to float32
 * in a small buffer, eight keys' dot products summed together, the block's softmax weights by a vectorized exp
 * (online softmax across blocks), then its V rows widened once and accumulated into each query head's output.
 * The threads split the keys; `edgectx_attn_partial` leaves each thread's (max, sum, weighted values) per query
 * head in its output, (D + 2, n_heads, parts), and `edgectx_attn_reduce` combines them (the graph runs the two
 * ops in order, so the second sees all of the first's work). With more threads than `parts`, the rest idle.
 *
 * Inputs, as the decode graph points them per step (edgectx.quant.ggml_decode):
 *   q     float32 (D, n_heads), rows contiguous, already rotated
 *   k, v  float16 (D, length, n_kv): rows of D contiguous halves, nb[1] between keys, nb[2] between KV heads
 *   mask  float16 or absent: (ne0 >= length, 1, n_heads), nb[2] between query heads; 0 or -inf per key
 * Query head h reads KV head h / (n_heads / n_kv). Scores are scaled by 1/sqrt(D). D is 64 or 128.
 */

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ggml.h's struct ggml_tensor, field for field (edgectx.quant.ggml_cpu._Tensor mirrors the same header;
 * edgectx_attn_layout lets the loader compare the two before using this library) */
struct tensor {
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct tensor *src[10];
    struct tensor *view_src;
    size_t view_offs;
    void *data;
    char name[64];
    void *extra;
    char padding[8];
};

#define BLOCK 64   /* keys per block: K or V rows widened to float32 take 16 KB (D = 64) */
#define MAX_GROUP 16

int64_t edgectx_attn_layout(int which) {
    switch (which) {
    case 0: return (int64_t) sizeof(struct tensor);
    case 1: return (int64_t) offsetof(struct tensor, src);
    case 2: return (int64_t) offsetof(struct tensor, data);
    default: return -1;
    }
}

/* exp(x) for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 polynomial (relative error about
 * 2e-7); below -87 (a masked key's -inf) exactly 0 */
static inline __m256 exp8(__m256 x) {
    const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.3981999507e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), zero_below);
}

/* The sums of eight vectors, one per lane */
static inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The scaled dot products of query q (D floats) with the eight widened keys at kbuf rows j .. j + 7, one per lane */
static inline __attribute__((always_inline)) __m256 scores8(const float *kbuf, int j, const float *q, int D, float scale) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm256_setzero_ps();
    for (int c = 0; c < D; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        for (int i = 0; i < 8; ++i)
            a[i] = _mm256_fmadd_ps(_mm256_load_ps(kbuf + (j + i) * D + c), qv, a[i]);
    }
    return _mm256_mul_ps(sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), _mm256_set1_ps(scale));
}

static inline void widen(float *dst, const char *src, size_t stride, int rows, int D) {
    for (int j = 0; j < rows; ++j) {
        const __m128i *row = (const __m128i *) (src + (size_t) j * stride);
        for (int c = 0; c < D / 8; ++c)
            _mm256_store_ps(dst + j * D + c * 8, _mm256_cvtph_ps(_mm_loadu_si128(row + c)));
    }
    for (int j = rows; j < BLOCK; ++j)
        memset(dst + j * D, 0, sizeof(float) * D);
}

/* One KV head's query group over keys [k0, k1): each query's running max m, sum s and weighted values acc (D) */
static inline __attribute__((always_inline)) void group_range(
        const int D, const int G, const float *q, const char *kbase, const char *vbase, size_t kstride,
        size_t vstride, const char *mbase, size_t mstride, int64_t k0, int64_t k1, float *m, float *s, float *acc) {
    float kbuf[BLOCK * 128] __attribute__((aligned(32)));
    float sc[MAX_GROUP][BLOCK] __attribute__((aligned(32)));
    const float scale = 1.0f / sqrtf((float) D);
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        s[g] = 0.0f;
        memset(acc + g * D, 0, sizeof(float) * D);
    }
    for (int64_t j0 = k0; j0 < k1; j0 += BLOCK) {
        const int n = (int) (k1 - j0 < BLOCK ? k1 - j0 : BLOCK);
        widen(kbuf, kbase + j0 * kstride, kstride, n, D);
        for (int g = 0; g < G; ++g) {
            const float *qg = q + g * D;
            const uint16_t *mrow = mbase ? (const uint16_t *) (mbase + g * mstride) + j0 : NULL;
            for (int j = 0; j < BLOCK; j += 8) {
                __m256 x = scores8(kbuf, j, qg, D, scale);
                if (mrow && j + 8 <= n) {
                    x = _mm256_add_ps(x, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (mrow + j))));
                } else if (mrow) {
                    float mk[8];
                    for (int i = 0; i < 8; ++i)
                        mk[i] = j + i < n ? _cvtsh_ss(mrow[j + i]) : 0.0f;
                    x = _mm256_add_ps(x, _mm256_loadu_ps(mk));
                }
                _mm256_store_ps(sc[g] + j, x);
            }
            for (int j = n; j < BLOCK; ++j)
                sc[g][j] = -INFINITY;
            /* the block's max, the running max, and the rescale of what came before */
            __m256 mx = _mm256_load_ps(sc[g]);
            for (int j = 8; j < BLOCK; j += 8)
                mx = _mm256_max_ps(mx, _mm256_load_ps(sc[g] + j));
            float lanes[8];
            _mm256_storeu_ps(lanes, mx);
            float bmax = lanes[0];
            for (int i = 1; i < 8; ++i)
                bmax = lanes[i] > bmax ? lanes[i] : bmax;
            if (bmax == -INFINITY) {  /* every key of the block masked for this query */
                for (int j = 0; j < BLOCK; ++j)
                    sc[g][j] = 0.0f;
                continue;
            }
            if (bmax > m[g]) {
                const float r = m[g] == -INFINITY ? 0.0f : expf(m[g] - bmax);
                s[g] *= r;
                for (int c = 0; c < D; ++c)
                    acc[g * D + c] *= r;
                m[g] = bmax;
            }
            const __m256 mm = _mm256_set1_ps(m[g]);
            __m256 total = _mm256_setzero_ps();
            for (int j = 0; j < BLOCK; j += 8) {
                const __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(sc[g] + j), mm));
                _mm256_store_ps(sc[g] + j, p);
                total = _mm256_add_ps(total, p);
            }
            _mm256_storeu_ps(lanes, total);
            s[g] += lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
        }
        widen(kbuf, vbase + j0 * vstride, vstride, n, D);  /* the block's V rows, into the same buffer */
        for (int g = 0; g < G; ++g) {
            float *out = acc + g * D;
            for (int c0 = 0; c0 < D; c0 += 64) {
                __m256 o[8];
                for (int c = 0; c < 8; ++c)
                    o[c] = _mm256_loadu_ps(out + c0 + c * 8);
                for (int j = 0; j < n; ++j) {
                    const __m256 p = _mm256_broadcast_ss(sc[g] + j);
                    const float *row = kbuf + j * D + c0;
                    for (int c = 0; c < 8; ++c)
                        o[c] = _mm256_fmadd_ps(p, _mm256_load_ps(row + c * 8), o[c]);
                }
                for (int c = 0; c < 8; ++c)
                    _mm256_storeu_ps(out + c0 + c * 8, o[c]);
            }
        }
    }
}

static inline __attribute__((always_inline)) void partial(const int D, struct tensor *dst, int ith, int nth) {
    const struct tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    const int n_heads = (int) q->ne[1], n_kv = (int) k->ne[2], G = n_heads / n_kv;
    const int64_t length = k->ne[1];
    const int parts = nth < dst->ne[2] ? nth : (int) dst->ne[2];  /* the output holds ne[2] threads' partials */
    if (ith >= parts)
        return;
    const int64_t chunk = (length + parts - 1) / parts;
    const int64_t k0 = ith * chunk < length ? ith * chunk : length;
    const int64_t k1 = k0 + chunk < length ? k0 + chunk : length;
    float *out = (float *) dst->data + (size_t) ith * n_heads * (D + 2);  /* per query head: m, s, acc[D] */
    float m[MAX_GROUP], s[MAX_GROUP], acc[MAX_GROUP * 128];
    for (int h = 0; h < n_kv; ++h) {
        const float *qh = (const float *) ((const char *) q->data + (size_t) h * G * q->nb[1]);
        const char *mbase = mask ? (const char *) mask->data + (size_t) h * G * mask->nb[2] : NULL;
        if (k1 > k0) {
            group_range(D, G, qh, (const char *) k->data + h * k->nb[2], (const char *) v->data + h * v->nb[2],
                        k->nb[1], v->nb[1], mbase, mask ? mask->nb[2] : 0, k0, k1, m, s, acc);
        } else {
            for (int g = 0; g < G; ++g) {
                m[g] = -INFINITY;
                s[g] = 0.0f;
            }
        }
        for (int g = 0; g < G; ++g) {
            float *row = out + (size_t) (h * G + g) * (D + 2);
            row[0] = m[g];
            row[1] = s[g];
            memcpy(row + 2, acc + g * D, sizeof(float) * D);
        }
    }
}

void edgectx_attn_partial(struct tensor *dst, int ith, int nth, void *userdata) {
    (void) userdata;
    if (dst->src[1]->ne[0] == 64)
        partial(64, dst, ith, nth);
    else
        partial(128, dst, ith, nth);
}

/* dst (D, n_heads): each query head's output from every thread's partial (src[0], as edgectx_attn_partial left it) */
void edgectx_attn_reduce(struct tensor *dst, int ith, int nth, void *userdata) {
    (void) userdata;
    const struct tensor *parts = dst->src[0];
    const int D = (int) dst->ne[0], n_heads = (int) dst->ne[1];
    const int n_parts = nth < parts->ne[2] ? nth : (int) parts->ne[2];  /* as edgectx_attn_partial split the keys */
    for (int h = ith; h < n_heads; h += nth) {
        float mx = -INFINITY;
        for (int t = 0; t < n_parts; ++t) {
            const float mt = ((const float *) parts->data)[((size_t) t * n_heads + h) * (D + 2)];
            mx = mt > mx ? mt : mx;
        }
        float *out = (float *) ((char *) dst->data + (size_t) h * dst->nb[1]);
        float total = 0.0f;
        memset(out, 0, sizeof(float) * D);
        for (int t = 0; t < n_parts; ++t) {
            const float *row = (const float *) parts->data + ((size_t) t * n_heads + h) * (D + 2);
            if (row[1] == 0.0f)
                continue;
            const float r = expf(row[0] - mx);
            total += row[1] * r;
            for (int c = 0; c < D; ++c)
                out[c] += row[2 + c] * r;
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int c = 0; c < D; ++c)
            out[c] *= inv;
    }
}

/* Rotate n columns of n_kv heads of pre-RoPE float16 keys at their positions into a float16 context, as
 * edgectx.model.rope.Rope.rotate does in float32 and the memory then rounds (as_stored), bit for bit:
 * x * cos + swap_halves(x) * signed_sin, each product and the sum rounded to float32 (no fused multiply-add:
 * built with -ffp-contract=off), then rounded to float16 (nearest even). cos and sin: the signed tables, rows of
 * d floats, every position below their length (the caller checks). Strides in elements; d a multiple of 16. */
void edgectx_rope_f16(uint16_t *dst, int64_t dst_head, const uint16_t *src, int64_t src_head, const int64_t *pos,
                      int64_t pos_head, int n_kv, int64_t n, int d, const float *cos, const float *sin) {
    const int half = d / 2;
    for (int h = 0; h < n_kv; ++h) {
        for (int64_t j = 0; j < n; ++j) {
            const uint16_t *x = src + h * src_head + j * d;
            uint16_t *out = dst + h * dst_head + j * d;
            const float *c = cos + pos[h * pos_head + j] * d, *s = sin + pos[h * pos_head + j] * d;
            for (int i = 0; i < half; i += 8) {
                const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i)));
                const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + half + i)));
                const __m256 a = _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + i)),
                                               _mm256_mul_ps(hi, _mm256_loadu_ps(s + i)));
                const __m256 b = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + i)),
                                               _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + i)));
                _mm_storeu_si128((__m128i *) (out + i), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
                _mm_storeu_si128((__m128i *) (out + half + i), _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT));
            }
        }
    }
}

/* Attention mass: out[h][j] = the sum, over the query rows of KV head h (its group's query heads x n_q queries), of
 * the softmax weight each puts on key j < length: what the eviction scorer observes and what the retrieval record
 * keeps (edgectx.memory.context). q: float32 (n_heads, n_q, D) rows, rotated and unscaled; k: float16 context,
 * heads k_head elements apart, rows of D. Key j is seen by query t of head h when valid (uint8, heads valid_head
 * apart; NULL: all) says so and, with idx (int64, heads idx_head apart) and q_idx (n_q) given, idx[j] <= q_idx[t].
 * A row that sees no key adds nothing. scratch: n_heads / n_kv * n_q * length floats. */
void edgectx_attention_mass(float *out, const float *q, int n_heads, int n_q, int n_kv, int D, const uint16_t *k,
                            int64_t k_head, int64_t length, const uint8_t *valid, int64_t valid_head,
                            const int64_t *idx, int64_t idx_head, const int64_t *q_idx, float *scratch) {
    float kbuf[BLOCK * 128] __attribute__((aligned(32)));
    const int G = n_heads / n_kv, rows = G * n_q;
    const float scale = 1.0f / sqrtf((float) D);
    for (int h = 0; h < n_kv; ++h) {
        const uint16_t *kh = k + h * k_head;
        float *mass = out + h * length;
        memset(mass, 0, sizeof(float) * length);
        for (int64_t j0 = 0; j0 < length; j0 += BLOCK) {
            const int n = (int) (length - j0 < BLOCK ? length - j0 : BLOCK);
            widen(kbuf, (const char *) (kh + j0 * D), (size_t) D * 2, n, D);
            /* each key's index as a float (exact below 2^24 tokens), +inf where its KV head does not see it at all */
            float kf[BLOCK] __attribute__((aligned(32)));
            for (int j = 0; j < BLOCK; ++j) {
                const int64_t jj = j0 + j;
                kf[j] = j >= n || (valid && !valid[h * valid_head + jj]) ? INFINITY
                        : idx ? (float) idx[h * idx_head + jj] : 0.0f;
            }
            for (int r = 0; r < rows; ++r) {
                const int g = r / n_q, t = r % n_q;
                const __m256 bound = _mm256_set1_ps(idx ? (float) q_idx[t] : 1.0f);
                const float *qr = q + ((size_t) (h * G + g) * n_q + t) * D;
                float *sr = scratch + (size_t) r * length + j0;
                for (int j = 0; j < n; j += 8) {
                    const __m256 x = scores8(kbuf, j, qr, D, scale);
                    const __m256 seen = _mm256_cmp_ps(_mm256_load_ps(kf + j), bound, _CMP_LE_OQ);
                    const __m256 y = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, seen);
                    if (j + 8 <= n) {
                        _mm256_storeu_ps(sr + j, y);
                    } else {  /* the row's last keys: the next row's scores follow them */
                        float s8[8];
                        _mm256_storeu_ps(s8, y);
                        for (int i = 0; j + i < n; ++i)
                            sr[j + i] = s8[i];
                    }
                }
            }
        }
        for (int r = 0; r < rows; ++r) {
            float *sr = scratch + (size_t) r * length;
            __m256 mv = _mm256_set1_ps(-INFINITY);
            int64_t jm = 0;
            for (; jm + 8 <= length; jm += 8)
                mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + jm));
            float lanes_max[8], mx = -INFINITY;
            _mm256_storeu_ps(lanes_max, mv);
            for (int i = 0; i < 8; ++i)
                mx = lanes_max[i] > mx ? lanes_max[i] : mx;
            for (; jm < length; ++jm)
                mx = sr[jm] > mx ? sr[jm] : mx;
            if (mx == -INFINITY)
                continue;
            const __m256 mm = _mm256_set1_ps(mx);
            __m256 total = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= length; j += 8) {
                const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mm));
                _mm256_storeu_ps(sr + j, p);
                total = _mm256_add_ps(total, p);
            }
            float lanes[8], sum = 0.0f;
            _mm256_storeu_ps(lanes, total);
            for (int i = 0; i < 8; ++i)
                sum += lanes[i];
            for (; j < length; ++j) {
                sr[j] = sr[j] == -INFINITY ? 0.0f : expf(sr[j] - mx);
                sum += sr[j];
            }
            const __m256 inv = _mm256_set1_ps(1.0f / sum);
            for (j = 0; j + 8 <= length; j += 8)
                _mm256_storeu_ps(mass + j, _mm256_add_ps(_mm256_loadu_ps(mass + j), _mm256_mul_ps(_mm256_loadu_ps(sr + j), inv)));
            for (; j < length; ++j)
                mass[j] += sr[j] / sum;
        }
    }
}
