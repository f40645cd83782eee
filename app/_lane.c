/* The native lane of POST /models: the plain query's ONNX file from its body, in C.

A plain query names whole primitive tasks, optionally `softmax` and `weights`, and
nothing else: {"tasks": [...], "options": {"softmax": true, "weights": "fp16"}}. Its
model is the library's fragment, the tasks' experts at the pool's default width in
sorted task order, a tail and the metadata, all joined from pieces the Python
assembler prepared (poe_core.assemble.Assembler.plain_pieces; app.serving.native
hands them over), so the bytes, the id and the headers are those the Python path
writes for the same query, byte for byte (tests/test_app_native.py holds them to it).

Anything else, or anything unusual (an unknown or repeated task, a string with an
escape, a key of another option, a duplicate key, a format the pool lacks), is not
answered here: `answer` returns None and the request goes
the Python way, which answers it or says what is wrong with it. The lane never
raises for a client's body; only running out of memory raises.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NFORMATS 3 /* fp32, fp16, int8: the order of the tables below */
#define NOUTPUTS 2 /* logits, probabilities */
#define MAX_STEM 80
#define MAX_GRAPH_NAME 200

static const char *FORMAT_NAMES[NFORMATS] = {"fp32", "fp16", "int8"};
static const char *OUTPUT_NAMES[NOUTPUTS] = {"logits", "probabilities"};

typedef struct {
    PyObject *name;              /* str, for the tasks tuple */
    const char *utf8;            /* its UTF-8 bytes (owned by `name`) */
    Py_ssize_t utf8_len;
    int ascii;                   /* graph names are cut at 200 characters: plain bytes only */
    Py_ssize_t position;         /* its bit in the model id's task mask */
    PyObject *concat_input;      /* bytes: the Concat node's input field */
    PyObject *labels;            /* bytes: the JSON strings of its classes, ", "-joined */
    Py_ssize_t classes;
    PyObject *task_json;         /* bytes: json.dumps(task) */
    PyObject *task_classes;      /* bytes: json.dumps(task) + ": " + json.dumps(class names) */
    PyObject *width_item;        /* bytes: json.dumps(task) + ": " + json.dumps(default width) */
    PyObject *stem;              /* bytes: the task's name as file names spell it */
    PyObject *class_stem;        /* bytes: its classes' names so spelled, "+"-joined */
    PyObject *fragment[NFORMATS]; /* bytes, or NULL where the pool lacks the format */
} Task;

typedef struct {
    PyObject_HEAD
    Py_ssize_t ntasks;
    Task *tasks;                 /* sorted by name */
    Py_ssize_t mask_bits;        /* 1 + the highest position */
    PyObject *id_prefix;         /* bytes: "<version>-<pool id[:8]>-" */
    PyObject *etag_tail;         /* bytes: ".<pool id>" */
    PyObject *header[NFORMATS];  /* bytes: ModelProto without graph + the graph field's tag, or NULL */
    PyObject *library[NFORMATS]; /* bytes, or NULL */
    PyObject *concat_rest;       /* bytes: the Concat node after its inputs */
    PyObject *softmax_field;
    PyObject *input_field;
    PyObject *output_fields[NOUTPUTS]; /* tuple of bytes, indexed by the number of classes */
    PyObject *pool_entries;
    PyObject *choice_entries[NOUTPUTS][NFORMATS];
    PyObject *version_entry;
    int widths_entry;            /* the pool has several widths: the metadata says them (poe.widths) */
    PyObject *digest;            /* id (bytes) -> the first 8 hex digits of its sha256 (bytes) */
} Table;

/* ---- a growable byte buffer ------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char local[8192];
} Buffer;

static void buf_init(Buffer *b) { b->data = b->local; b->len = 0; b->cap = sizeof b->local; }
static void buf_free(Buffer *b) { if (b->data != b->local) PyMem_Free(b->data); }

static int buf_reserve(Buffer *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Malloc(cap);
    if (data == NULL) { PyErr_NoMemory(); return -1; }
    memcpy(data, b->data, b->len);
    buf_free(b);
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(Buffer *b, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static int put_str(Buffer *b, const char *s) { return put(b, s, (Py_ssize_t)strlen(s)); }

static int put_bytes(Buffer *b, PyObject *o) { return put(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o)); }

static Py_ssize_t varint_len(uint64_t n) {
    Py_ssize_t k = 1;
    while (n >= 0x80) { n >>= 7; k++; }
    return k;
}

static int put_varint(Buffer *b, uint64_t n) {
    char out[10];
    Py_ssize_t k = 0;
    while (n >= 0x80) { out[k++] = (char)((n & 0x7F) | 0x80); n >>= 7; }
    out[k++] = (char)n;
    return put(b, out, k);
}

/* A length-delimited protobuf field's tag and length; its payload follows. */
static int put_field_head(Buffer *b, int number, Py_ssize_t length) {
    if (put_varint(b, (uint64_t)(number << 3 | 2)) < 0) return -1;
    return put_varint(b, (uint64_t)length);
}

static Py_ssize_t field_len(int number, Py_ssize_t length) {
    return varint_len((uint64_t)(number << 3 | 2)) + varint_len((uint64_t)length) + length;
}

/* ---- the body ------------------------------------------------------------------- */

typedef struct {
    const char *p, *end;
} Cursor;

static void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int eat(Cursor *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) { c->p++; return 1; }
    return 0;
}

/* A JSON string without escapes or control characters: its bytes, or 0. */
static int string(Cursor *c, const char **s, Py_ssize_t *n) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *start = ++c->p;
    while (c->p < c->end && *c->p != '"') {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '\\' || ch < 0x20) return 0;
        c->p++;
    }
    if (c->p >= c->end) return 0;
    *s = start;
    *n = c->p - start;
    c->p++;
    return 1;
}

static int literal(Cursor *c, const char *word) {
    Py_ssize_t n = (Py_ssize_t)strlen(word);
    skip_ws(c);
    if (c->end - c->p < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

static int is(const char *s, Py_ssize_t n, const char *word) {
    return (Py_ssize_t)strlen(word) == n && memcmp(s, word, n) == 0;
}

static Py_ssize_t find_task(Table *t, const char *s, Py_ssize_t n) {
    Py_ssize_t lo = 0, hi = t->ntasks;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        Task *task = &t->tasks[mid];
        Py_ssize_t common = task->utf8_len < n ? task->utf8_len : n;
        int cmp = memcmp(task->utf8, s, common);
        if (cmp == 0) cmp = (task->utf8_len > n) - (task->utf8_len < n);
        if (cmp == 0) return mid;
        if (cmp < 0) lo = mid + 1; else hi = mid;
    }
    return -1;
}

/* The options object: softmax and weights, each at most once; 0 for anything else. */
static int options(Cursor *c, int *output, int *format) {
    int seen_softmax = 0, seen_weights = 0;
    if (!eat(c, '{')) return 0;
    if (eat(c, '}')) return 1;
    do {
        const char *key, *value;
        Py_ssize_t klen, vlen;
        if (!string(c, &key, &klen) || !eat(c, ':')) return 0;
        if (is(key, klen, "softmax") && !seen_softmax) {
            seen_softmax = 1;
            if (literal(c, "true")) *output = 1;
            else if (literal(c, "false")) *output = 0;
            else return 0;
        } else if (is(key, klen, "weights") && !seen_weights) {
            seen_weights = 1;
            if (!string(c, &value, &vlen)) return 0;
            int found = -1;
            for (int f = 0; f < NFORMATS; f++)
                if (is(value, vlen, FORMAT_NAMES[f])) found = f;
            if (found < 0) return 0;
            *format = found;
        } else {
            return 0;
        }
    } while (eat(c, ','));
    return eat(c, '}');
}

/* The body's tasks (marked in `chosen`), output and format; 0 if it is not a plain query. */
static int parse(Table *t, const char *body, Py_ssize_t n, char *chosen, Py_ssize_t *count,
                 int *output, int *format) {
    Cursor c = {body, body + n};
    int seen_tasks = 0, seen_options = 0;
    if (!eat(&c, '{')) return 0;
    do {
        const char *key;
        Py_ssize_t klen;
        if (!string(&c, &key, &klen) || !eat(&c, ':')) return 0;
        if (is(key, klen, "tasks") && !seen_tasks) {
            seen_tasks = 1;
            if (!eat(&c, '[')) return 0;
            do {
                const char *name;
                Py_ssize_t len;
                if (!string(&c, &name, &len)) return 0;
                Py_ssize_t i = find_task(t, name, len);
                if (i < 0 || chosen[i]) return 0; /* unknown or repeated: the Python way says which */
                chosen[i] = 1;
                (*count)++;
            } while (eat(&c, ','));
            if (!eat(&c, ']')) return 0;
        } else if (is(key, klen, "options") && !seen_options) {
            seen_options = 1;
            if (!options(&c, output, format)) return 0;
        } else {
            return 0;
        }
    } while (eat(&c, ','));
    if (!eat(&c, '}')) return 0;
    skip_ws(&c);
    return c.p == c.end && *count > 0;
}

/* ---- the answer ----------------------------------------------------------------- */

/* A metadata entry (ModelProto field 14: key 1, value 2) whose value is
   open + the pieces of `which` (", "-joined) + close. */
static int put_entry(Buffer *b, const char *key, char open, char close, Task **chosen, Py_ssize_t count,
                     Py_ssize_t offset) {
    Py_ssize_t value = 2 + 2 * (count - 1);
    for (Py_ssize_t i = 0; i < count; i++)
        value += PyBytes_GET_SIZE(*(PyObject **)((char *)chosen[i] + offset));
    Py_ssize_t klen = (Py_ssize_t)strlen(key);
    Py_ssize_t inner = field_len(1, klen) + field_len(2, value);
    if (put_field_head(b, 14, inner) < 0 || put_field_head(b, 1, klen) < 0 || put(b, key, klen) < 0
        || put_field_head(b, 2, value) < 0 || put(b, &open, 1) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i > 0 && put(b, ", ", 2) < 0) return -1;
        if (put_bytes(b, *(PyObject **)((char *)chosen[i] + offset)) < 0) return -1;
    }
    return put(b, &close, 1);
}

static PyObject *answer(Table *t, const char *body, Py_ssize_t n) {
    char chosen_local[256];
    Task *order_local[256];
    char *chosen = t->ntasks <= 256 ? chosen_local : PyMem_Calloc(t->ntasks, 1);
    Task **order = t->ntasks <= 256 ? order_local : PyMem_Malloc(t->ntasks * sizeof(Task *));
    char *mask = NULL;
    PyObject *result = NULL, *tasks = NULL, *chunks = NULL, *head = NULL;
    Buffer tail, hb;
    buf_init(&tail);
    buf_init(&hb);
    if (chosen == NULL || order == NULL) { PyErr_NoMemory(); goto done; }
    if (chosen == chosen_local) memset(chosen, 0, t->ntasks);

    Py_ssize_t count = 0;
    int output = 0, format = 0;
    if (!parse(t, body, n, chosen, &count, &output, &format) || t->header[format] == NULL) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t k = 0, classes = 0, joined = 0;
    for (Py_ssize_t i = 0; i < t->ntasks; i++) {
        if (!chosen[i]) continue;
        Task *task = order[k++] = &t->tasks[i];
        if (!task->ascii || task->fragment[format] == NULL) { result = Py_NewRef(Py_None); goto done; }
        classes += task->classes;
        joined += (k > 1) + task->utf8_len;
    }
    if (classes >= PyTuple_GET_SIZE(t->output_fields[output])) {
        result = Py_NewRef(Py_None); /* an output the table lacks: the Python way */
        goto done;
    }

    /* The graph's tail: Concat, the Softmax if asked, the name, the input, the output. */
    Py_ssize_t concat = PyBytes_GET_SIZE(t->concat_rest);
    for (Py_ssize_t i = 0; i < count; i++) concat += PyBytes_GET_SIZE(order[i]->concat_input);
    if (put_field_head(&tail, 1, concat) < 0) goto done;
    for (Py_ssize_t i = 0; i < count; i++)
        if (put_bytes(&tail, order[i]->concat_input) < 0) goto done;
    if (put_bytes(&tail, t->concat_rest) < 0) goto done;
    if (output == 1 && put_bytes(&tail, t->softmax_field) < 0) goto done;
    Py_ssize_t name_len = 4 + (joined < MAX_GRAPH_NAME ? joined : MAX_GRAPH_NAME);
    if (put_field_head(&tail, 2, name_len) < 0) goto done;
    Py_ssize_t name_start = tail.len;
    if (put(&tail, "poe_", 4) < 0) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        if ((i > 0 && put(&tail, "+", 1) < 0) || put(&tail, order[i]->utf8, order[i]->utf8_len) < 0) goto done;
    }
    tail.len = name_start + name_len;
    if (put_bytes(&tail, t->input_field) < 0) goto done;
    if (put_bytes(&tail, PyTuple_GET_ITEM(t->output_fields[output], classes)) < 0) goto done;
    Py_ssize_t tail_graph = tail.len; /* the graph's part of the tail; the metadata follows */
    Py_ssize_t graph = tail_graph + PyBytes_GET_SIZE(t->library[format]);
    for (Py_ssize_t i = 0; i < count; i++) graph += PyBytes_GET_SIZE(order[i]->fragment[format]);

    /* The metadata, after the graph. */
    if (put_entry(&tail, "poe.labels", '[', ']', order, count, offsetof(Task, labels)) < 0
        || put_entry(&tail, "poe.tasks", '[', ']', order, count, offsetof(Task, task_json)) < 0
        || put_entry(&tail, "poe.task_classes", '{', '}', order, count, offsetof(Task, task_classes)) < 0
        || put_bytes(&tail, t->pool_entries) < 0 || put_bytes(&tail, t->choice_entries[output][format]) < 0)
        goto done;
    if (t->widths_entry && put_entry(&tail, "poe.widths", '{', '}', order, count, offsetof(Task, width_item)) < 0)
        goto done;
    if (put_bytes(&tail, t->version_entry) < 0) goto done;

    /* The file: header, graph field (library, experts, tail), metadata. */
    Buffer first;
    buf_init(&first);
    if (put_bytes(&first, t->header[format]) < 0 || put_varint(&first, (uint64_t)graph) < 0) {
        buf_free(&first);
        goto done;
    }
    chunks = PyTuple_New(count + 3);
    if (chunks == NULL) { buf_free(&first); goto done; }
    PyObject *start = PyBytes_FromStringAndSize(first.data, first.len);
    Py_ssize_t size = first.len + graph - tail_graph + tail.len;
    buf_free(&first);
    if (start == NULL) goto done;
    PyTuple_SET_ITEM(chunks, 0, start);
    PyTuple_SET_ITEM(chunks, 1, Py_NewRef(t->library[format]));
    for (Py_ssize_t i = 0; i < count; i++) PyTuple_SET_ITEM(chunks, 2 + i, Py_NewRef(order[i]->fragment[format]));
    PyObject *end = PyBytes_FromStringAndSize(tail.data, tail.len);
    if (end == NULL) goto done;
    PyTuple_SET_ITEM(chunks, count + 2, end);

    /* The id: "<version>-<pool id[:8]>-<task mask in hex>-<output>-<weights>". */
    mask = PyMem_Calloc((size_t)(t->mask_bits + 3) / 4 + 1, 1);
    if (mask == NULL) { PyErr_NoMemory(); goto done; }
    Py_ssize_t nibbles = (t->mask_bits + 3) / 4;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t bit = order[i]->position;
        mask[nibbles - 1 - bit / 4] |= (char)(1 << (bit % 4));
    }
    Py_ssize_t top = 0;
    while (top < nibbles - 1 && mask[top] == 0) top++;
    /* A mask that starts with hex digit c names its download by class, as class-level ids
       do (app.serving.models.file_name, as it always has). */
    int by_class = mask[top] == 12;
    for (Py_ssize_t i = top; i < nibbles; i++) mask[i] = "0123456789abcdef"[(int)mask[i]];
    Buffer id;
    buf_init(&id);
    if (put_bytes(&id, t->id_prefix) < 0 || put(&id, mask + top, nibbles - top) < 0 || put(&id, "-", 1) < 0
        || put_str(&id, OUTPUT_NAMES[output]) < 0 || put(&id, "-", 1) < 0 || put_str(&id, FORMAT_NAMES[format]) < 0) {
        buf_free(&id);
        goto done;
    }

    /* The download's name: its tasks (or classes), "+"-joined, or when that is over 80
       characters their number and the id's hash; then its options. */
    Buffer name;
    buf_init(&name);
    for (Py_ssize_t i = 0; i < count; i++)
        if ((i > 0 && put(&name, "+", 1) < 0)
            || put_bytes(&name, by_class ? order[i]->class_stem : order[i]->stem) < 0) {
            buf_free(&name);
            buf_free(&id);
            goto done;
        }
    if (name.len > MAX_STEM) {
        PyObject *ident = PyBytes_FromStringAndSize(id.data, id.len);
        PyObject *hash = ident == NULL ? NULL : PyObject_CallOneArg(t->digest, ident);
        Py_XDECREF(ident);
        char number[32];
        snprintf(number, sizeof number, "%zd-", by_class ? classes : count);
        name.len = 0;
        if (hash == NULL || !PyBytes_Check(hash) || put_str(&name, number) < 0
            || put_str(&name, by_class ? "classes-" : "tasks-") < 0 || put_bytes(&name, hash) < 0) {
            if (hash != NULL && !PyBytes_Check(hash)) PyErr_SetString(PyExc_TypeError, "digest must return bytes");
            Py_XDECREF(hash);
            buf_free(&name);
            buf_free(&id);
            goto done;
        }
        Py_DECREF(hash);
    }

    /* The headers, as app.serving.models.ServedModel.head writes them. */
    char length[32];
    snprintf(length, sizeof length, "%zd", size);
    int ok = put_str(&hb, "content-type: application/octet-stream\r\ncontent-length: ") == 0
        && put_str(&hb, length) == 0 && put_str(&hb, "\r\netag: \"") == 0 && put(&hb, id.data, id.len) == 0
        && put_bytes(&hb, t->etag_tail) == 0
        && put_str(&hb, "\"\r\ncache-control: public, max-age=31536000, immutable\r\nx-model-id: ") == 0
        && put(&hb, id.data, id.len) == 0 && put_str(&hb, "\r\ncontent-disposition: attachment; filename=\"poe-") == 0
        && put(&hb, name.data, name.len) == 0;
    buf_free(&id);
    buf_free(&name);
    if (!ok) goto done;
    if ((output == 1 && put_str(&hb, "-softmax") < 0)
        || (format != 0 && (put(&hb, "-", 1) < 0 || put_str(&hb, FORMAT_NAMES[format]) < 0))
        || put_str(&hb, ".onnx\"\r\n") < 0)
        goto done;
    head = PyBytes_FromStringAndSize(hb.data, hb.len);
    if (head == NULL) goto done;

    tasks = PyTuple_New(count);
    if (tasks == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) PyTuple_SET_ITEM(tasks, i, Py_NewRef(order[i]->name));
    result = PyTuple_Pack(3, tasks, head, chunks);

done:
    Py_XDECREF(tasks);
    Py_XDECREF(head);
    Py_XDECREF(chunks);
    buf_free(&tail);
    buf_free(&hb);
    PyMem_Free(mask);
    if (chosen != chosen_local) PyMem_Free(chosen);
    if (order != order_local) PyMem_Free(order);
    return result;
}

/* ---- the type ------------------------------------------------------------------- */

static PyObject *Table_answer(Table *self, PyObject *body) {
    if (!PyBytes_Check(body)) {
        PyErr_SetString(PyExc_TypeError, "answer() takes the body as bytes");
        return NULL;
    }
    return answer(self, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body));
}

static void Table_clear_task(Task *task) {
    Py_CLEAR(task->name);
    Py_CLEAR(task->concat_input);
    Py_CLEAR(task->labels);
    Py_CLEAR(task->task_json);
    Py_CLEAR(task->task_classes);
    Py_CLEAR(task->width_item);
    Py_CLEAR(task->stem);
    Py_CLEAR(task->class_stem);
    for (int f = 0; f < NFORMATS; f++) Py_CLEAR(task->fragment[f]);
}

static void Table_dealloc(Table *self) {
    for (Py_ssize_t i = 0; i < self->ntasks; i++) Table_clear_task(&self->tasks[i]);
    PyMem_Free(self->tasks);
    Py_CLEAR(self->id_prefix);
    Py_CLEAR(self->etag_tail);
    for (int f = 0; f < NFORMATS; f++) { Py_CLEAR(self->header[f]); Py_CLEAR(self->library[f]); }
    Py_CLEAR(self->concat_rest);
    Py_CLEAR(self->softmax_field);
    Py_CLEAR(self->input_field);
    for (int o = 0; o < NOUTPUTS; o++) {
        Py_CLEAR(self->output_fields[o]);
        for (int f = 0; f < NFORMATS; f++) Py_CLEAR(self->choice_entries[o][f]);
    }
    Py_CLEAR(self->pool_entries);
    Py_CLEAR(self->version_entry);
    Py_CLEAR(self->digest);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* bytes (a new reference), or NULL with an error; None gives NULL without one if `optional`. */
static PyObject *take_bytes(PyObject *o, int optional, const char *what) {
    if (optional && o == Py_None) return NULL;
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes%s", what, optional ? " or None" : "");
        return NULL;
    }
    return Py_NewRef(o);
}

#define TAKE(dst, obj, what) do { if (((dst) = take_bytes((obj), 0, (what))) == NULL) return -1; } while (0)
#define TAKE_OPTIONAL(dst, obj, what) do { \
    (dst) = take_bytes((obj), 1, (what)); if ((dst) == NULL && PyErr_Occurred()) return -1; } while (0)

static int formats(PyObject *seq, PyObject **out, const char *what) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != NFORMATS) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of %d", what, NFORMATS);
        return -1;
    }
    for (int f = 0; f < NFORMATS; f++) TAKE_OPTIONAL(out[f], PyTuple_GET_ITEM(seq, f), what);
    return 0;
}

static int Table_init(Table *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tasks", "id_prefix", "etag_tail", "headers", "library", "concat_rest",
                             "softmax_field", "input_field", "output_fields", "pool_entries", "choice_entries",
                             "version_entry", "widths_entry", "digest", NULL};
    PyObject *tasks, *id_prefix, *etag_tail, *headers, *library, *concat_rest, *softmax_field, *input_field,
        *output_fields, *pool_entries, *choice_entries, *version_entry, *digest;
    int widths_entry;
    if (self->tasks != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Table is made once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOO!O!OOOO!OO!OpO", kwlist, &PyList_Type, &tasks, &id_prefix,
                                     &etag_tail, &PyTuple_Type, &headers, &PyTuple_Type, &library, &concat_rest,
                                     &softmax_field, &input_field, &PyTuple_Type, &output_fields, &pool_entries,
                                     &PyTuple_Type, &choice_entries, &version_entry, &widths_entry, &digest))
        return -1;
    TAKE(self->id_prefix, id_prefix, "id_prefix");
    TAKE(self->etag_tail, etag_tail, "etag_tail");
    if (formats(headers, self->header, "headers") < 0 || formats(library, self->library, "library") < 0) return -1;
    TAKE(self->concat_rest, concat_rest, "concat_rest");
    TAKE(self->softmax_field, softmax_field, "softmax_field");
    TAKE(self->input_field, input_field, "input_field");
    TAKE(self->pool_entries, pool_entries, "pool_entries");
    TAKE(self->version_entry, version_entry, "version_entry");
    self->widths_entry = widths_entry;
    if (!PyCallable_Check(digest)) {
        PyErr_SetString(PyExc_TypeError, "digest must be callable");
        return -1;
    }
    self->digest = Py_NewRef(digest);
    if (PyTuple_GET_SIZE(output_fields) != NOUTPUTS || PyTuple_GET_SIZE(choice_entries) != NOUTPUTS) {
        PyErr_SetString(PyExc_TypeError, "output_fields and choice_entries are per output (logits, probabilities)");
        return -1;
    }
    for (int o = 0; o < NOUTPUTS; o++) {
        PyObject *fields = PyTuple_GET_ITEM(output_fields, o);
        if (!PyTuple_Check(fields)) {
            PyErr_SetString(PyExc_TypeError, "output_fields[o] must be a tuple of bytes by number of classes");
            return -1;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++)
            if (!PyBytes_Check(PyTuple_GET_ITEM(fields, i))) {
                PyErr_SetString(PyExc_TypeError, "output_fields[o] must be a tuple of bytes by number of classes");
                return -1;
            }
        self->output_fields[o] = Py_NewRef(fields);
        if (formats(PyTuple_GET_ITEM(choice_entries, o), self->choice_entries[o], "choice_entries[o]") < 0) return -1;
    }
    for (int f = 0; f < NFORMATS; f++) {
        if ((self->header[f] == NULL) != (self->library[f] == NULL)
            || (self->header[f] != NULL && (self->choice_entries[0][f] == NULL || self->choice_entries[1][f] == NULL))) {
            PyErr_SetString(PyExc_ValueError, "a format needs its header, library and choice entries");
            return -1;
        }
    }

    Py_ssize_t n = PyList_GET_SIZE(tasks);
    self->tasks = PyMem_Calloc(n > 0 ? n : 1, sizeof(Task));
    if (self->tasks == NULL) { PyErr_NoMemory(); return -1; }
    self->ntasks = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        Task *task = &self->tasks[i];
        PyObject *name, *concat_input, *labels, *task_json, *task_classes, *width_item, *stem, *class_stem,
            *fragments;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(tasks, i), "UnOOnOOOOOO!;a task is (name, position, concat_input, "
                              "labels, classes, task_json, task_classes, width_item, stem, class_stem, fragments)",
                              &name, &task->position, &concat_input, &labels, &task->classes, &task_json,
                              &task_classes, &width_item, &stem, &class_stem, &PyTuple_Type, &fragments))
            return -1;
        task->name = Py_NewRef(name);
        task->utf8 = PyUnicode_AsUTF8AndSize(name, &task->utf8_len);
        if (task->utf8 == NULL) return -1;
        task->ascii = PyUnicode_IS_ASCII(name);
        if (task->position < 0 || task->classes < 1) {
            PyErr_SetString(PyExc_ValueError, "a task's position is >= 0 and it has classes");
            return -1;
        }
        if (task->position + 1 > self->mask_bits) self->mask_bits = task->position + 1;
        TAKE(task->concat_input, concat_input, "concat_input");
        TAKE(task->labels, labels, "labels");
        TAKE(task->task_json, task_json, "task_json");
        TAKE(task->task_classes, task_classes, "task_classes");
        TAKE(task->width_item, width_item, "width_item");
        TAKE(task->stem, stem, "stem");
        TAKE(task->class_stem, class_stem, "class_stem");
        if (formats(fragments, task->fragment, "fragments") < 0) return -1;
        if (i > 0) {
            Task *before = &self->tasks[i - 1];
            Py_ssize_t common = before->utf8_len < task->utf8_len ? before->utf8_len : task->utf8_len;
            int cmp = memcmp(before->utf8, task->utf8, common);
            if (cmp > 0 || (cmp == 0 && before->utf8_len >= task->utf8_len)) {
                PyErr_SetString(PyExc_ValueError, "tasks must be sorted by name, each once");
                return -1;
            }
        }
    }
    return 0;
}

static PyMethodDef Table_methods[] = {
    {"answer", (PyCFunction)Table_answer, METH_O,
     "answer(body: bytes) -> (tasks, head, chunks) | None\n\n"
     "The plain query's file: its tasks in order (str), the header lines of the answer and the file's "
     "pieces (the pool's fragments among them, not copied); None when the body is not a plain query "
     "this table can answer."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app._lane.Table",
    .tp_doc = "The pieces of one pool version's plain models (see the module's docstring).",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
};

static struct PyModuleDef lane_module = {
    PyModuleDef_HEAD_INIT, "app._lane",
    "The native lane of POST /models (see app/_lane.c and app.serving.native).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&lane_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
