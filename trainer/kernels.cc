// Fused CPU kernels of the trainer: row-sparse optimizer updates of embedding
// tables, and matrix factorization's score with its gradient.
//
// Row-sparse updates, one op each.
//
// A sparse gradient arrives as (indices [n], grad [n, d]) with duplicate rows.
// TensorFlow's CPU path takes many ops per table (Unique, UnsortedSegmentSum,
// a gather of each slot and of the table, the update arithmetic, a scatter of
// each), and its per-row kernels run an Eigen expression per row of 33
// floats: with random rows of a 200k-row table they cost 3-5x what the memory
// accesses do. Each op here does the whole update in two passes:
//
//   1. duplicates summed, in batch order, into one row per distinct index
//      (open addressing; the sums are those of UnsortedSegmentSum, which also
//      adds the rows in batch order);
//   2. each distinct row of the table and of its slots read and written once,
//      the rows a few iterations ahead prefetched.
//
// The mathematics are the Keras optimizers' of trainer/embedding.py (g the
// summed gradient of a row):
//   RowSparseSgd:       var -= lr * g
//   RowSparseAdagrad:   acc += g * g;  var -= lr * g / sqrt(acc)
//                       (the slot already holds Keras' epsilon, see there)
//   RowSparseLazyAdam:  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g * g;
//                       var -= alpha * m / (sqrt(v) + epsilon)
// Variables are locked (exclusively, in address order) as TensorFlow's own
// ResourceSparseApply* kernels lock them. An index outside the table fails
// the op before anything is written.

#define EIGEN_USE_THREADS

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
constexpr int kAhead = 8;  // Rows prefetched ahead in the update pass.

absl::Status NoOutputs(shape_inference::InferenceContext*) {
  return absl::OkStatus();
}

// Every cache line of a row (rows of 33 floats straddle lines).
template <int kForWrite>
inline void Prefetch(const float* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, kForWrite);
  __builtin_prefetch(p + bytes - 1, kForWrite);
}

struct Sgd {
  static constexpr int kSlots = 0;
  static constexpr int kScalars = 1;  // lr
  static void Apply(const float* s, float* var, float* const*, const float* c,
                    int64_t d) {
    const float lr = c[0];
    for (int64_t k = 0; k < d; ++k) var[k] -= lr * s[k];
  }
};

struct Adagrad {
  static constexpr int kSlots = 1;
  static constexpr int kScalars = 1;  // lr
  static void Apply(const float* s, float* var, float* const* slot,
                    const float* c, int64_t d) {
    const float lr = c[0];
    float* acc = slot[0];
    for (int64_t k = 0; k < d; ++k) {
      const float a = acc[k] + s[k] * s[k];
      acc[k] = a;
      var[k] -= lr * s[k] / std::sqrt(a);
    }
  }
};

struct LazyAdam {
  static constexpr int kSlots = 2;
  static constexpr int kScalars = 4;  // alpha, beta_1, beta_2, epsilon
  static void Apply(const float* s, float* var, float* const* slot,
                    const float* c, int64_t d) {
    const float alpha = c[0], b1 = c[1], b2 = c[2], eps = c[3];
    float* m = slot[0];
    float* v = slot[1];
    for (int64_t k = 0; k < d; ++k) {
      const float mk = b1 * m[k] + (1 - b1) * s[k];
      const float vk = b2 * v[k] + (1 - b2) * (s[k] * s[k]);
      m[k] = mk;
      v[k] = vk;
      var[k] -= alpha * mk / (std::sqrt(vk) + eps);
    }
  }
};

// Inputs: var, slots..., indices, grad, scalars...
template <typename Index, class Rule>
class RowSparseApplyOp : public OpKernel {
 public:
  explicit RowSparseApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr int kVars = 1 + Rule::kSlots;
    std::vector<int> var_inputs;
    for (int i = 0; i < kVars; ++i) var_inputs.push_back(i);
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        ctx, /*do_lock=*/true, /*sparse=*/true, var_inputs);
    Tensor vars[kVars];
    for (int i = 0; i < kVars; ++i) {
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(
                              ctx, i, /*lock_held=*/true, /*sparse=*/true,
                              &vars[i]));
      OP_REQUIRES(ctx, vars[i].dims() == 2,
                  absl::InvalidArgumentError("Variables must be matrices."));
      OP_REQUIRES(ctx, vars[i].shape() == vars[0].shape(),
                  absl::InvalidArgumentError(
                      "A slot's shape differs from its variable's."));
    }
    const Tensor& indices = ctx->input(kVars);
    const Tensor& grad = ctx->input(kVars + 1);
    const int64_t rows = vars[0].dim_size(0), d = vars[0].dim_size(1);
    const int64_t n = indices.NumElements();
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(indices.shape()),
                absl::InvalidArgumentError("indices must be a vector."));
    OP_REQUIRES(ctx, grad.dims() == 2 && grad.dim_size(0) == n &&
                         grad.dim_size(1) == d,
                absl::InvalidArgumentError(absl::StrCat(
                    "grad must be [", n, ", ", d, "], is ",
                    grad.shape().DebugString())));
    float scalars[Rule::kScalars > 0 ? Rule::kScalars : 1];
    for (int i = 0; i < Rule::kScalars; ++i) {
      const Tensor& t = ctx->input(kVars + 2 + i);
      OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(t.shape()),
                  absl::InvalidArgumentError("Hyperparameters are scalars."));
      scalars[i] = t.scalar<float>()();
    }
    if (n == 0) return;

    // 1. Distinct rows and their summed gradients, in batch order.
    const Index* ids = indices.flat<Index>().data();
    const float* g = grad.flat<float>().data();
    int64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    std::vector<int32_t> table(cap, -1);
    std::vector<int64_t> uniq;
    uniq.reserve(n);
    Tensor sums_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, TensorShape({n, d}),
                                           &sums_t));
    float* sums = sums_t.flat<float>().data();
    const int shift = 64 - __builtin_ctzll(static_cast<uint64_t>(cap));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = static_cast<int64_t>(ids[i]);
      OP_REQUIRES(ctx, id >= 0 && id < rows,
                  absl::InvalidArgumentError(absl::StrCat(
                      "Index ", id, " at position ", i, " is outside [0, ",
                      rows, ").")));
      uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift;
      int32_t s;
      while ((s = table[h]) >= 0 && uniq[s] != id) h = (h + 1) & (cap - 1);
      const float* src = g + i * d;
      if (s < 0) {
        table[h] = static_cast<int32_t>(uniq.size());
        std::memcpy(sums + uniq.size() * d, src, d * sizeof(float));
        uniq.push_back(id);
      } else {
        float* dst = sums + s * d;
        for (int64_t k = 0; k < d; ++k) dst[k] += src[k];
      }
    }

    // 2. One read and write of each distinct row of the table and slots.
    float* base[kVars];
    for (int i = 0; i < kVars; ++i) base[i] = vars[i].template flat<float>().data();
    const int64_t m = uniq.size(), bytes = d * sizeof(float);
    float* slot_rows[Rule::kSlots > 0 ? Rule::kSlots : 1];
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) {
        for (int i = 0; i < kVars; ++i)
          Prefetch<1>(base[i] + uniq[j + kAhead] * d, bytes);
      }
      const int64_t r = uniq[j] * d;
      for (int i = 0; i < Rule::kSlots; ++i) slot_rows[i] = base[1 + i] + r;
      Rule::Apply(sums + j * d, base[0] + r, slot_rows, scalars, d);
    }
  }
};

#define REGISTER_ROW_OP(NAME, RULE)                                         \
  REGISTER_KERNEL_BUILDER(Name(NAME)                                        \
                              .Device(DEVICE_CPU)                           \
                              .TypeConstraint<int32_t>("Tindices"),         \
                          RowSparseApplyOp<int32_t, RULE>);                 \
  REGISTER_KERNEL_BUILDER(Name(NAME)                                        \
                              .Device(DEVICE_CPU)                           \
                              .TypeConstraint<int64_t>("Tindices"),         \
                          RowSparseApplyOp<int64_t, RULE>);

REGISTER_OP("RowSparseSgd")
    .Input("var: resource")
    .Input("indices: Tindices")
    .Input("grad: float")
    .Input("lr: float")
    .Attr("Tindices: {int32, int64}")
    .SetIsStateful()
    .SetShapeFn(NoOutputs);

REGISTER_OP("RowSparseAdagrad")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("indices: Tindices")
    .Input("grad: float")
    .Input("lr: float")
    .Attr("Tindices: {int32, int64}")
    .SetIsStateful()
    .SetShapeFn(NoOutputs);

REGISTER_OP("RowSparseLazyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("indices: Tindices")
    .Input("grad: float")
    .Input("alpha: float")
    .Input("beta_1: float")
    .Input("beta_2: float")
    .Input("epsilon: float")
    .Attr("Tindices: {int32, int64}")
    .SetIsStateful()
    .SetShapeFn(NoOutputs);

// Matrix factorization's score, <u[:-1], v[:-1]> + u[-1] + v[-1] per row (the
// last slot of a row is its bias), and its gradient. TensorFlow needs about
// ten [B, d] ops for the two (the product, the bias mask, the sum, the
// broadcasts of the backward pass): 0.45-0.53 ms per batch of 4096 x 33;
// these make one pass each.
REGISTER_OP("BiasedDot")
    .Input("u: float")
    .Input("v: float")
    .Output("score: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle u, v;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &u));
      TF_RETURN_IF_ERROR(c->Merge(u, c->input(1), &v));
      c->set_output(0, c->Vector(c->Dim(v, 0)));
      return absl::OkStatus();
    });

REGISTER_OP("BiasedDotGrad")
    .Input("u: float")
    .Input("v: float")
    .Input("grad: float")
    .Output("grad_u: float")
    .Output("grad_v: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return absl::OkStatus();
    });

absl::Status CheckDotInputs(const Tensor& u, const Tensor& v) {
  if (u.dims() != 2 || u.shape() != v.shape() || u.dim_size(1) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "u and v must be matrices of one shape with a bias slot; are ",
        u.shape().DebugString(), " and ", v.shape().DebugString()));
  }
  return absl::OkStatus();
}

class BiasedDotOp : public OpKernel {
 public:
  explicit BiasedDotOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& u = ctx->input(0);
    const Tensor& v = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckDotInputs(u, v));
    const int64_t n = u.dim_size(0), d = u.dim_size(1);
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &out));
    const float* a = u.flat<float>().data();
    const float* b = v.flat<float>().data();
    float* o = out->flat<float>().data();
    for (int64_t i = 0; i < n; ++i) {
      const float* x = a + i * d;
      const float* y = b + i * d;
      // Eight partial sums (a sequential sum would wait on each addition).
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= d - 1; k += 8) {
        for (int j = 0; j < 8; ++j) part[j] += x[k + j] * y[k + j];
      }
      float s = ((part[0] + part[4]) + (part[1] + part[5])) +
                ((part[2] + part[6]) + (part[3] + part[7]));
      for (; k < d - 1; ++k) s += x[k] * y[k];
      o[i] = s + x[d - 1] + y[d - 1];
    }
  }
};

class BiasedDotGradOp : public OpKernel {
 public:
  explicit BiasedDotGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& u = ctx->input(0);
    const Tensor& v = ctx->input(1);
    const Tensor& g = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckDotInputs(u, v));
    const int64_t n = u.dim_size(0), d = u.dim_size(1);
    OP_REQUIRES(ctx, g.dims() == 1 && g.dim_size(0) == n,
                absl::InvalidArgumentError("grad must be [rows of u]."));
    Tensor *gu, *gv;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, u.shape(), &gu));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, v.shape(), &gv));
    const float* a = u.flat<float>().data();
    const float* b = v.flat<float>().data();
    const float* gs = g.flat<float>().data();
    float* da = gu->flat<float>().data();
    float* db = gv->flat<float>().data();
    for (int64_t i = 0; i < n; ++i) {
      const float gi = gs[i];
      const float* x = a + i * d;
      const float* y = b + i * d;
      float* dx = da + i * d;
      float* dy = db + i * d;
      for (int64_t k = 0; k + 1 < d; ++k) {
        dx[k] = gi * y[k];
        dy[k] = gi * x[k];
      }
      dx[d - 1] = gi;
      dy[d - 1] = gi;
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("BiasedDot").Device(DEVICE_CPU), BiasedDotOp);
REGISTER_KERNEL_BUILDER(Name("BiasedDotGrad").Device(DEVICE_CPU),
                        BiasedDotGradOp);

// Rows of a table, table[indices] (the lookup of training): ResourceGather's
// result, with the rows a few iterations ahead prefetched (its memcpy per
// row waits on each row's cache misses: 280 vs 135 us for 4,096 random rows
// of a 200k x 33 table). The variable is read as ResourceGather reads it.
REGISTER_OP("RowGather")
    .Input("table: resource")
    .Input("indices: Tindices")
    .Output("rows: float")
    .Attr("Tindices: {int32, int64}")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle indices;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &indices));
      c->set_output(0, c->Matrix(c->Dim(indices, 0),
                                 shape_inference::InferenceContext::kUnknownDim));
      return absl::OkStatus();
    });

template <typename Index>
class RowGatherOp : public OpKernel {
 public:
  explicit RowGatherOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<Var> var;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &var));
    OP_REQUIRES_OK(ctx, EnsureSparseVariableAccess<CPUDevice, float>(
                            ctx, var.get()));
    tf_shared_lock lock(*var->mu());
    const Tensor& table = *var->tensor();
    OP_REQUIRES(ctx, table.dims() == 2 && table.dtype() == DT_FLOAT,
                absl::InvalidArgumentError("The table must be a float matrix."));
    const Tensor& indices = ctx->input(1);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(indices.shape()),
                absl::InvalidArgumentError("indices must be a vector."));
    const int64_t n = indices.NumElements(), rows = table.dim_size(0),
                  d = table.dim_size(1);
    const Index* ids = indices.template flat<Index>().data();
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, ids[i] >= 0 && ids[i] < rows,
                  absl::InvalidArgumentError(absl::StrCat(
                      "Index ", ids[i], " at position ", i,
                      " is outside [0, ", rows, ").")));
    }
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, d}), &out));
    const float* src = table.flat<float>().data();
    float* dst = out->flat<float>().data();
    const int64_t bytes = d * sizeof(float);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) Prefetch<0>(src + ids[i + kAhead] * d, bytes);
      std::memcpy(dst + i * d, src + ids[i] * d, bytes);
    }
  }
};

REGISTER_KERNEL_BUILDER(
    Name("RowGather").Device(DEVICE_CPU).TypeConstraint<int32_t>("Tindices"),
    RowGatherOp<int32_t>);
REGISTER_KERNEL_BUILDER(
    Name("RowGather").Device(DEVICE_CPU).TypeConstraint<int64_t>("Tindices"),
    RowGatherOp<int64_t>);

REGISTER_ROW_OP("RowSparseSgd", Sgd)
REGISTER_ROW_OP("RowSparseAdagrad", Adagrad)
REGISTER_ROW_OP("RowSparseLazyAdam", LazyAdam)

}  // namespace
}  // namespace tensorflow
