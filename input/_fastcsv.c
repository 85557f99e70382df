/* Native inner loops of the CSV input pipeline (input/csv_dataset.py).
 *
 * parse(pieces, delimiter, ncols, fields, kinds, outs, rows) -> bool
 *   Parses whole lines of numeric CSV text straight into column arrays,
 *   without the GIL. It handles only plain text: every line exactly `ncols`
 *   fields, wanted int64 fields of the form -?[0-9]{1,18}, wanted float32
 *   fields of the form -?[0-9]+(.[0-9]{1,8})? with at most 15 digits, no
 *   quotes, no empty line, "\n" or "\r\n" line ends. On anything else it
 *   returns False and writes nothing the caller keeps: the caller then parses
 *   the text with pyarrow, which reports or skips bad rows exactly as before.
 *   Within that subset the values are pyarrow's, bit for bit: an int64 is
 *   exact, and a float32 is the decimal value correctly rounded (the
 *   mantissa and 10^k are exact doubles, their quotient is correctly
 *   rounded, and with k <= 8 digits after the point rounding that double to
 *   float32 cannot cross a float32 rounding boundary).
 *
 * shuffle(array, item_size, bit_generator_capsule) -> None
 *   numpy's Generator.shuffle of a 1-D array of 4- or 8-byte items, the same
 *   draws in the same order (Fisher-Yates from the last item, each index
 *   from numpy's random_interval), so the same permutation and the same
 *   generator state after it; 3x faster because the indices of a block are
 *   drawn first and the items they swap fetched ahead. The caller holds the
 *   bit generator's lock.
 *
 * mix(buffer, slots, rows, out) -> None
 *   The mixing buffer's exchange: out[i] = buffer[slots[i]], then
 *   buffer[slots[i]] = rows[i], for fixed-size records without Python
 *   objects. One pass, each slot's row read and written while in cache;
 *   the slots of one call are distinct (one turn of a permutation), so this
 *   equals numpy's take-then-put exactly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 256

typedef struct {
  char kind; /* 'i' int64, 'f' float32 */
  char *out;
} Column;

static const double kPow10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8};
static const uint64_t kPow10Int[] = {1,      10,      100,      1000,     10000,
                                     100000, 1000000, 10000000, 100000000};

/* Reads the run of decimal digits at *pp (eight at a time where eight bytes
 * are readable); returns how many there were (counting stops past 19) and
 * their value in *value (meaningful up to 19 digits). */
static inline Py_ssize_t read_digits(const char **pp, const char *end,
                                     uint64_t *value) {
  const char *p = *pp;
  uint64_t v = 0;
  Py_ssize_t n = 0;
  while (end - p >= 8 && n <= 19) {
    uint64_t x;
    memcpy(&x, p, 8);
    x ^= 0x3030303030303030ULL; /* Digits become 0..9. */
    /* A byte is not a digit iff it is now >= 10: its top bit is set once
     * 0x76 is added (or was already). Carries only reach later bytes. */
    const uint64_t other =
        ((x + 0x7676767676767676ULL) | x) & 0x8080808080808080ULL;
    const int len = other ? __builtin_ctzll(other) >> 3 : 8;
    if (len == 0) break;
    /* The run's digits to the top bytes, zeros (leading zeros) below. */
    uint64_t d = len == 8 ? x : x << (8 * (8 - len));
    d = (d * 10 + (d >> 8)) & 0x00FF00FF00FF00FFULL;
    d = (d * 100 + (d >> 16)) & 0x0000FFFF0000FFFFULL;
    d = (d * 10000 + (d >> 32)) & 0x00000000FFFFFFFFULL;
    v = v * kPow10Int[len] + d;
    n += len;
    p += len;
    if (len < 8) {
      *pp = p;
      *value = v;
      return n;
    }
  }
  while (p < end && (unsigned char)(*p - '0') < 10 && n <= 19) {
    v = v * 10 + (uint64_t)(*p - '0');
    p++;
    n++;
  }
  *pp = p;
  *value = v;
  return n;
}

/* Byte classes of a skipped field: 0 part of it, 1 ends it, 2 not plain. */
static unsigned char skip_class[256];

/* Parses [p, end) of whole lines from row *row on; 0 if the text is not
 * plain (see above) or holds more than max_rows lines. */
static int parse_text(const char *p, const char *end, char delim, int ncols,
                      const int *column_of_field, const Column *columns,
                      Py_ssize_t *row, Py_ssize_t max_rows) {
  Py_ssize_t r = *row;
  unsigned char stop[256];
  memcpy(stop, skip_class, sizeof(stop));
  stop[(unsigned char)delim] = 1;
  while (p < end) {
    if (r >= max_rows) return 0;
    for (int f = 0; f < ncols; f++) {
      const int c = column_of_field[f];
      if (c < 0) { /* A field nobody reads: skipped, but never quoted. */
        unsigned char k;
        while (p < end && (k = stop[(unsigned char)*p]) == 0) p++;
        if (p < end && k == 2) return 0;
      } else {
        int negative = 0;
        if (p < end && *p == '-') {
          negative = 1;
          p++;
        }
        uint64_t v;
        const Py_ssize_t whole = read_digits(&p, end, &v);
        if (columns[c].kind == 'i') {
          if (whole == 0 || whole > 18) return 0;
          ((int64_t *)columns[c].out)[r] = negative ? -(int64_t)v : (int64_t)v;
        } else {
          Py_ssize_t fraction = 0;
          if (whole == 0 || whole > 15) return 0;
          if (p < end && *p == '.') {
            p++;
            uint64_t f;
            fraction = read_digits(&p, end, &f);
            if (fraction == 0 || fraction > 8 || whole + fraction > 15)
              return 0;
            v = v * kPow10Int[fraction] + f;
          }
          double x = (double)v;
          if (fraction) x /= kPow10[fraction];
          float value = (float)x;
          ((float *)columns[c].out)[r] = negative ? -value : value;
        }
      }
      if (f + 1 < ncols) {
        if (p >= end || *p != delim) return 0;
        p++;
      } else {
        if (p < end && *p == '\r') p++;
        if (p >= end || *p != '\n') return 0;
        p++;
      }
    }
    r++;
  }
  *row = r;
  return 1;
}

static PyObject *fastcsv_parse(PyObject *self, PyObject *args) {
  PyObject *pieces, *fields, *outs;
  const char *kinds;
  Py_ssize_t nkinds, rows;
  int delimiter, ncols;
  if (!PyArg_ParseTuple(args, "OCiOs#On", &pieces, &delimiter, &ncols, &fields,
                        &kinds, &nkinds, &outs, &rows))
    return NULL;
  PyObject *pieces_seq = PySequence_Fast(pieces, "pieces must be a sequence");
  if (!pieces_seq) return NULL;
  PyObject *fields_seq = PySequence_Fast(fields, "fields must be a sequence");
  PyObject *outs_seq =
      fields_seq ? PySequence_Fast(outs, "outs must be a sequence") : NULL;
  Py_ssize_t npieces = PySequence_Fast_GET_SIZE(pieces_seq);
  Py_ssize_t nwanted = fields_seq ? PySequence_Fast_GET_SIZE(fields_seq) : 0;
  Py_buffer *texts = NULL, *out_views = NULL;
  Py_ssize_t got_texts = 0, got_outs = 0;
  PyObject *result = NULL;
  int column_of_field[MAX_FIELDS];
  Column columns[MAX_FIELDS];

  if (!outs_seq) goto done;
  if (ncols < 1 || ncols > MAX_FIELDS || nwanted != nkinds ||
      nwanted != PySequence_Fast_GET_SIZE(outs_seq) || nwanted > ncols) {
    PyErr_SetString(PyExc_ValueError, "parse: inconsistent arguments");
    goto done;
  }
  for (int f = 0; f < ncols; f++) column_of_field[f] = -1;
  texts = PyMem_Calloc(npieces ? npieces : 1, sizeof(Py_buffer));
  out_views = PyMem_Calloc(nwanted ? nwanted : 1, sizeof(Py_buffer));
  if (!texts || !out_views) {
    PyErr_NoMemory();
    goto done;
  }
  for (Py_ssize_t c = 0; c < nwanted; c++) {
    long field = PyLong_AsLong(PySequence_Fast_GET_ITEM(fields_seq, c));
    if (field == -1 && PyErr_Occurred()) goto done;
    const char kind = kinds[c];
    if (field < 0 || field >= ncols || column_of_field[field] >= 0 ||
        (kind != 'i' && kind != 'f')) {
      PyErr_SetString(PyExc_ValueError, "parse: bad field or kind");
      goto done;
    }
    if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(outs_seq, c),
                           &out_views[c], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS))
      goto done;
    got_outs++;
    if (out_views[c].len < rows * (kind == 'i' ? 8 : 4)) {
      PyErr_SetString(PyExc_ValueError, "parse: output array too small");
      goto done;
    }
    column_of_field[field] = (int)c;
    columns[c].kind = kind;
    columns[c].out = out_views[c].buf;
  }
  for (Py_ssize_t i = 0; i < npieces; i++) {
    if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(pieces_seq, i), &texts[i],
                           PyBUF_C_CONTIGUOUS))
      goto done;
    got_texts++;
  }
  int ok = 1;
  Py_ssize_t row = 0;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t i = 0; i < npieces && ok; i++) {
    const char *p = texts[i].buf;
    ok = parse_text(p, p + texts[i].len, (char)delimiter, ncols,
                    column_of_field, columns, &row, rows);
  }
  Py_END_ALLOW_THREADS
  result = PyBool_FromLong(ok && row == rows);

done:
  for (Py_ssize_t i = 0; i < got_texts; i++) PyBuffer_Release(&texts[i]);
  for (Py_ssize_t i = 0; i < got_outs; i++) PyBuffer_Release(&out_views[i]);
  PyMem_Free(texts);
  PyMem_Free(out_views);
  Py_XDECREF(outs_seq);
  Py_XDECREF(fields_seq);
  Py_DECREF(pieces_seq);
  return result;
}

/* One exchange loop per record size, so that each copy is a few moves. */
#define MIX_LOOP(SIZE)                                          \
  for (Py_ssize_t i = 0; i < n; i++) {                                 \
    if (i + 8 < n) __builtin_prefetch(buf + (Py_ssize_t)slots[i + 8] * (SIZE), 1); \
    char *slot = buf + (Py_ssize_t)slots[i] * (SIZE);                  \
    memcpy(out + i * (SIZE), slot, (SIZE));                            \
    memcpy(slot, in + i * (SIZE), (SIZE));                             \
  }

#define MIX_SIZES                                                \
  switch (size) {                                                       \
    case 12: MIX_LOOP(12) break;                                 \
    case 16: MIX_LOOP(16) break;                                 \
    case 20: MIX_LOOP(20) break;                                 \
    case 24: MIX_LOOP(24) break;                                 \
    case 28: MIX_LOOP(28) break;                                 \
    case 32: MIX_LOOP(32) break;                                 \
    case 36: MIX_LOOP(36) break;                                 \
    case 40: MIX_LOOP(40) break;                                 \
    default: MIX_LOOP(size) break;                               \
  }

static PyObject *fastcsv_mix(PyObject *self, PyObject *args) {
  PyObject *buffer_obj, *slots_obj, *rows_obj, *out_obj;
  Py_ssize_t size, slot_width;
  if (!PyArg_ParseTuple(args, "OOOOnn", &buffer_obj, &slots_obj, &rows_obj,
                        &out_obj, &size, &slot_width))
    return NULL;
  Py_buffer b, s, r, o;
  if (PyObject_GetBuffer(buffer_obj, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS))
    return NULL;
  if (PyObject_GetBuffer(slots_obj, &s, PyBUF_C_CONTIGUOUS)) {
    PyBuffer_Release(&b);
    return NULL;
  }
  if (PyObject_GetBuffer(rows_obj, &r, PyBUF_C_CONTIGUOUS)) {
    PyBuffer_Release(&b);
    PyBuffer_Release(&s);
    return NULL;
  }
  if (PyObject_GetBuffer(out_obj, &o, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)) {
    PyBuffer_Release(&b);
    PyBuffer_Release(&s);
    PyBuffer_Release(&r);
    return NULL;
  }
  PyObject *result = NULL;
  const Py_ssize_t n = size > 0 ? r.len / size : 0;
  const Py_ssize_t capacity = size > 0 ? b.len / size : 0;
  if (size <= 0 || (slot_width != 4 && slot_width != 8) ||
      s.len != n * slot_width || o.len != r.len || r.len % size) {
    PyErr_SetString(PyExc_ValueError, "mix: inconsistent arguments");
    goto done;
  }
  /* Every slot must lie inside the buffer. */
  for (Py_ssize_t i = 0; i < n; i++) {
    const int64_t slot = slot_width == 4 ? ((int32_t *)s.buf)[i]
                                         : ((int64_t *)s.buf)[i];
    if (slot < 0 || slot >= capacity) {
      PyErr_SetString(PyExc_IndexError, "mix: slot outside the buffer");
      goto done;
    }
  }
  char *buf = b.buf, *out = o.buf;
  const char *in = r.buf;
  Py_BEGIN_ALLOW_THREADS
  if (slot_width == 4) {
    const int32_t *slots = s.buf;
    MIX_SIZES
  } else {
    const int64_t *slots = s.buf;
    MIX_SIZES
  }
  Py_END_ALLOW_THREADS
  result = Py_NewRef(Py_None);

done:
  PyBuffer_Release(&b);
  PyBuffer_Release(&s);
  PyBuffer_Release(&r);
  PyBuffer_Release(&o);
  return result;
}

/* numpy/random/bitgen.h */
typedef struct {
  void *state;
  uint64_t (*next_uint64)(void *st);
  uint32_t (*next_uint32)(void *st);
  double (*next_double)(void *st);
  uint64_t (*next_raw)(void *st);
} bitgen_t;

/* numpy's random_interval: uniform in [0, max] by masked rejection. */
static inline uint64_t random_interval(bitgen_t *g, uint64_t max) {
  if (max == 0) return 0;
  uint64_t mask = max, value;
  mask |= mask >> 1;
  mask |= mask >> 2;
  mask |= mask >> 4;
  mask |= mask >> 8;
  mask |= mask >> 16;
  mask |= mask >> 32;
  if (max <= 0xffffffffULL) {
    while ((value = (g->next_uint32(g->state) & mask)) > max) {
    }
  } else {
    while ((value = (g->next_uint64(g->state) & mask)) > max) {
    }
  }
  return value;
}

#define SHUFFLE_BLOCK 4096
#define SHUFFLE_LOOP(T)                                                   \
  {                                                                       \
    T *x = (T *)data;                                                     \
    for (Py_ssize_t hi = n - 1; hi >= 1; hi -= SHUFFLE_BLOCK) {           \
      const Py_ssize_t m = hi >= SHUFFLE_BLOCK ? SHUFFLE_BLOCK : hi;      \
      for (Py_ssize_t k = 0; k < m; k++)                                  \
        js[k] = (Py_ssize_t)random_interval(g, (uint64_t)(hi - k));       \
      for (Py_ssize_t k = 0; k < m; k++) {                                \
        if (k + 16 < m) __builtin_prefetch(&x[js[k + 16]], 1);            \
        const Py_ssize_t i = hi - k, j = js[k];                           \
        const T t = x[j];                                                 \
        x[j] = x[i];                                                      \
        x[i] = t;                                                         \
      }                                                                   \
    }                                                                     \
  }

static PyObject *fastcsv_shuffle(PyObject *self, PyObject *args) {
  PyObject *array_obj, *capsule;
  Py_ssize_t size;
  if (!PyArg_ParseTuple(args, "OnO", &array_obj, &size, &capsule)) return NULL;
  if (size != 4 && size != 8) {
    PyErr_SetString(PyExc_ValueError, "shuffle: items of 4 or 8 bytes");
    return NULL;
  }
  bitgen_t *g = PyCapsule_GetPointer(capsule, "BitGenerator");
  if (!g) return NULL;
  Py_buffer b;
  if (PyObject_GetBuffer(array_obj, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS))
    return NULL;
  Py_ssize_t *js = PyMem_Malloc(SHUFFLE_BLOCK * sizeof(Py_ssize_t));
  if (!js) {
    PyBuffer_Release(&b);
    return PyErr_NoMemory();
  }
  const Py_ssize_t n = b.len / size;
  char *data = b.buf;
  Py_BEGIN_ALLOW_THREADS
  if (size == 4)
    SHUFFLE_LOOP(int32_t)
  else
    SHUFFLE_LOOP(int64_t)
  Py_END_ALLOW_THREADS
  PyMem_Free(js);
  PyBuffer_Release(&b);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"shuffle", fastcsv_shuffle, METH_VARARGS,
     "shuffle(array, item_size, bit_generator_capsule) -> None"},
    {"parse", fastcsv_parse, METH_VARARGS,
     "parse(pieces, delimiter, ncols, fields, kinds, outs, rows) -> bool"},
    {"mix", fastcsv_mix, METH_VARARGS,
     "mix(buffer, slots, rows, out, record_size, slot_width) -> None"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcsv",
                                    "Native loops of the CSV input pipeline.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__fastcsv(void) {
  skip_class[(unsigned char)'\n'] = 1;
  skip_class[(unsigned char)'\r'] = 2;
  skip_class[(unsigned char)'"'] = 2;
  PyObject *m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "MAX_FIELDS", MAX_FIELDS)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
