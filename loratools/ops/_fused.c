/* One pass per merged row block, for the common merge into bfloat16 (see fused.py).

   numpy needs six passes over a block to widen the base, add ΔW, check that the sum rounds to a
   finite bfloat16 and round it (ties to even); here each element is read once and written once,
   with the very same integer arithmetic on the float32 bits, so the output bits are identical
   (tests/test_fused.py holds them against the numpy path and against the definition).

   Built with -ffp-contract=off: a sum or a product must be rounded to float32 on its own, as
   numpy rounds it; a fused multiply-add would change bits. Each function is compiled for several
   instruction sets and the loader picks one for the CPU at hand; integer arithmetic and single
   IEEE operations give the same bits whichever it picks.

   No numpy C API: plain buffers, so building needs only a C compiler and Python's headers. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Round to nearest bfloat16, ties to even, on the bits: add 0x7FFF plus the lowest kept bit
   (uint32, wrapping), keep the top half. Exactly ops/rounding.py's bit path. */
static inline uint32_t rounded(uint32_t x) { return x + 0x7FFFu + ((x >> 16) & 1u); }

/* out = bf16(widen(base) + delta); returns nonzero if some sum is not below `limit` in magnitude
   (NaN included). delta NULL: no ΔW on these rows (the sum is the base). */
CLONES static int add_bf16(const uint16_t *base, const float *delta, uint16_t *out, Py_ssize_t n, float limit) {
    int bad = 0;
    if (delta) {
        for (Py_ssize_t i = 0; i < n; i++) {
            float v = float_of((uint32_t)base[i] << 16) + delta[i];
            bad |= !(fabsf(v) < limit);
            out[i] = (uint16_t)(rounded(bits_of(v)) >> 16);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            float v = float_of((uint32_t)base[i] << 16);
            bad |= !(fabsf(v) < limit);
            out[i] = base[i];  /* a bfloat16 widened and rounded again is itself */
        }
    }
    return bad;
}

/* The same from float32 values; round_base: first round them to bfloat16 precision (a value the
   4-bit model holds in bfloat16). */
CLONES static int add_f32(const float *base, const float *delta, uint16_t *out, Py_ssize_t n, float limit, int round_base) {
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float b = round_base ? float_of(rounded(bits_of(base[i])) & 0xFFFF0000u) : base[i];
        float v = delta ? b + delta[i] : b;
        bad |= !(fabsf(v) < limit);
        out[i] = (uint16_t)(rounded(bits_of(v)) >> 16);
    }
    return bad;
}

/* The same from a bitsandbytes 4-bit weight: element j is code[nibble j] * absmax[j / blocksize]
   (the high nibble of each byte first), one float32 product, as the numpy decoder computes it.
   Per quantization block the 16 products are computed once (the same products, so the same
   bits) and each element looks its value up: 16 lanes at a time with AVX-512 (one permute),
   8 with AVX2 (two permutes and a blend), one by one otherwise. `level` caps which of them may
   be used (set_level: the tests run each one the CPU has). */
static int level = 2;  /* 2: AVX-512 if the CPU has it, 1: AVX2 at most, 0: one by one */

static inline uint16_t finish(float v, float limit, int *bad) {
    *bad |= !(fabsf(v) < limit);
    return (uint16_t)(rounded(bits_of(v)) >> 16);
}

/* Elements i..stop-1 one by one (any alignment). */
static int lookup_scalar(const uint8_t *packed, Py_ssize_t first, const float *table, const float *delta,
                         uint16_t *out, Py_ssize_t i, Py_ssize_t stop, float limit) {
    int bad = 0;
    for (; i < stop; i++) {
        Py_ssize_t k = first + i;
        float b = table[(packed[k >> 1] >> ((k & 1) ? 0 : 4)) & 15];
        out[i] = finish(delta ? b + delta[i] : b, limit, &bad);
    }
    return bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 16 elements from 8 packed bytes (first + i even): returns how many were done. */
__attribute__((target("avx512f"))) static Py_ssize_t lookup_avx512(
    const uint8_t *packed, Py_ssize_t first, const float *table, const float *delta, uint16_t *out, Py_ssize_t i,
    Py_ssize_t stop, float limit, int *bad) {
    const __m512 tbl = _mm512_loadu_ps(table);
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i fifteen = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    const __m512 lim = _mm512_set1_ps(limit);
    Py_ssize_t start = i;
    __mmask16 ok = 0xFFFF;
    for (; i + 16 <= stop; i += 16) {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(packed + ((first + i) >> 1)));
        __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));  /* each byte twice */
        idx = _mm512_and_si512(_mm512_srlv_epi32(idx, shifts), fifteen);  /* high nibble, then low */
        __m512 v = _mm512_permutexvar_ps(idx, tbl);
        if (delta) v = _mm512_add_ps(v, _mm512_loadu_ps(delta + i));
        ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(v), lim, _CMP_LT_OQ);
        __m512i x = _mm512_castps_si512(v);
        x = _mm512_add_epi32(_mm512_add_epi32(x, half), _mm512_and_si512(_mm512_srli_epi32(x, 16), one));
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
    }
    *bad |= ok != 0xFFFF;
    return i - start;
}

/* 8 elements from 4 packed bytes (first + i even). */
__attribute__((target("avx2"))) static Py_ssize_t lookup_avx2(
    const uint8_t *packed, Py_ssize_t first, const float *table, const float *delta, uint16_t *out, Py_ssize_t i,
    Py_ssize_t stop, float limit, int *bad) {
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const __m256i fifteen = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
    const __m256 lim = _mm256_set1_ps(limit), sign = _mm256_set1_ps(-0.0f);
    Py_ssize_t start = i;
    int ok = 0xFF;
    for (; i + 8 <= stop; i += 8) {
        int32_t four;
        memcpy(&four, packed + ((first + i) >> 1), 4);
        __m128i bytes = _mm_cvtsi32_si128(four);
        __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
        idx = _mm256_and_si256(_mm256_srlv_epi32(idx, shifts), fifteen);
        /* entries 0-7 or 8-15 by bit 3 of the index, moved up to the sign bit blendv reads */
        __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx), _mm256_permutevar8x32_ps(high, idx),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        if (delta) v = _mm256_add_ps(v, _mm256_loadu_ps(delta + i));
        ok &= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), lim, _CMP_LT_OQ));
        __m256i x = _mm256_castps_si256(v);
        x = _mm256_add_epi32(_mm256_add_epi32(x, half), _mm256_and_si256(_mm256_srli_epi32(x, 16), one));
        x = _mm256_srli_epi32(x, 16);
        __m256i packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0x08);  /* lanes' halves together */
        _mm_storeu_si128((__m128i *)(out + i), _mm256_castsi256_si128(packed16));
    }
    *bad |= ok != 0xFF;
    return i - start;
}
#endif

static int add_4bit(const uint8_t *packed, Py_ssize_t first, const float *code, const float *absmax,
                    Py_ssize_t blocksize, const float *delta, uint16_t *out, Py_ssize_t n, float limit,
                    int round_base) {
    int bad = 0, simd = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (level >= 2 && __builtin_cpu_supports("avx512f")) simd = 2;
    else if (level >= 1 && __builtin_cpu_supports("avx2")) simd = 1;
#endif
    Py_ssize_t i = 0;
    float table[16];
    while (i < n) {
        Py_ssize_t block = (first + i) / blocksize;
        Py_ssize_t stop = (block + 1) * blocksize - first;  /* the rest of this quantization block */
        if (stop > n) stop = n;
        for (int c = 0; c < 16; c++) {
            float q = code[c] * absmax[block];
            table[c] = round_base ? float_of(rounded(bits_of(q)) & 0xFFFF0000u) : q;
        }
        if ((first + i) & 1) {  /* start on a low nibble: one element to reach a byte boundary */
            bad |= lookup_scalar(packed, first, table, delta, out, i, i + 1, limit);
            i++;
        }
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd == 2) i += lookup_avx512(packed, first, table, delta, out, i, stop, limit, &bad);
        else if (simd == 1) i += lookup_avx2(packed, first, table, delta, out, i, stop, limit, &bad);
#endif
        bad |= lookup_scalar(packed, first, table, delta, out, i, stop, limit);
        i = stop;
    }
    return bad;
}

/* ---- Python side: buffers in, a bool (all finite) out ---------------------------------------- */

static int get_delta(PyObject *obj, Py_buffer *view, Py_ssize_t n) {
    if (obj == Py_None) { view->buf = NULL; view->obj = NULL; return 0; }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len < n * 4) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "delta holds fewer values than out");
        return -1;
    }
    return 0;
}

static PyObject *finished(Py_buffer *views[], int count, int bad) {
    for (int k = 0; k < count; k++)
        if (views[k]->obj) PyBuffer_Release(views[k]);
    return PyBool_FromLong(!bad);
}

/* add_bf16 (itemsize 2: a bfloat16 base) and add_f32 (4: float32, and round_base) */
static PyObject *add_stored(PyObject *args, Py_ssize_t itemsize) {
    Py_buffer base, out, delta = {0};
    PyObject *delta_obj;
    float limit;
    int round_base = 0;
    if (!PyArg_ParseTuple(args, itemsize == 2 ? "y*Ow*f" : "y*Ow*fp", &base, &delta_obj, &out, &limit, &round_base))
        return NULL;
    Py_ssize_t n = out.len / 2;
    Py_buffer *views[] = {&base, &out, &delta};
    if (base.len < n * itemsize) {
        finished(views, 2, 0);
        PyErr_SetString(PyExc_ValueError, "base holds fewer values than out");
        return NULL;
    }
    if (get_delta(delta_obj, &delta, n) < 0) { finished(views, 2, 0); return NULL; }
    int bad;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 2)
        bad = add_bf16((const uint16_t *)base.buf, (const float *)delta.buf, (uint16_t *)out.buf, n, limit);
    else
        bad = add_f32((const float *)base.buf, (const float *)delta.buf, (uint16_t *)out.buf, n, limit, round_base);
    Py_END_ALLOW_THREADS
    return finished(views, 3, bad);
}

static PyObject *py_add_bf16(PyObject *self, PyObject *args) { return add_stored(args, 2); }

static PyObject *py_add_f32(PyObject *self, PyObject *args) { return add_stored(args, 4); }

static PyObject *py_add_4bit(PyObject *self, PyObject *args) {
    Py_buffer packed, code, absmax, out, delta = {0};
    PyObject *delta_obj;
    Py_ssize_t first, blocksize;
    float limit;
    int round_base;
    if (!PyArg_ParseTuple(args, "y*ny*y*nOw*fp", &packed, &first, &code, &absmax, &blocksize, &delta_obj, &out,
                          &limit, &round_base))
        return NULL;
    Py_ssize_t n = out.len / 2;
    Py_buffer *views[] = {&packed, &code, &absmax, &out, &delta};
    const char *wrong = NULL;
    if (first < 0 || blocksize <= 0) wrong = "first and blocksize must be positive";
    else if (code.len < 16 * 4) wrong = "a 4-bit code table has 16 values";
    else if (packed.len * 2 < first + n) wrong = "packed holds fewer values than asked for";
    else if (n && absmax.len / 4 <= (first + n - 1) / blocksize) wrong = "absmax holds fewer blocks than asked for";
    if (wrong) {
        finished(views, 4, 0);
        PyErr_SetString(PyExc_ValueError, wrong);
        return NULL;
    }
    if (get_delta(delta_obj, &delta, n) < 0) { finished(views, 4, 0); return NULL; }
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = add_4bit((const uint8_t *)packed.buf, first, (const float *)code.buf, (const float *)absmax.buf, blocksize,
                   (const float *)delta.buf, (uint16_t *)out.buf, n, limit, round_base);
    Py_END_ALLOW_THREADS
    return finished(views, 5, bad);
}

static PyObject *py_set_level(PyObject *self, PyObject *args) {
    int wanted, previous = level;
    if (!PyArg_ParseTuple(args, "i", &wanted)) return NULL;
    level = wanted;
    return PyLong_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"set_level", py_set_level, METH_VARARGS,
     "set_level(k) -> previous: the 4-bit lookup uses AVX-512 (2), AVX2 (1) or neither (0) at most."},
    {"add_bf16", py_add_bf16, METH_VARARGS,
     "add_bf16(base, delta, out, limit) -> all finite: out = bf16(base + delta), base bfloat16 bits (uint16)."},
    {"add_f32", py_add_f32, METH_VARARGS,
     "add_f32(base, delta, out, limit, round_base) -> all finite: the same from float32 values."},
    {"add_4bit", py_add_4bit, METH_VARARGS,
     "add_4bit(packed, first, code, absmax, blocksize, delta, out, limit, round_base) -> all finite: "
     "the same from a bitsandbytes 4-bit weight's elements first..first+n."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
