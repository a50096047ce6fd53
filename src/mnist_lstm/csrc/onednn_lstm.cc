// A whole-sequence LSTM for TensorFlow on the CPU: forward and backward each run as oneDNN's fused
// LSTM primitive instead of ~40 small TensorFlow ops per timestep.
//
// Same math and weight layout as keras.layers.LSTM (sigmoid gates, tanh, gate order i f c o):
//   x [N,T,C], h0/c0 [N,H], kernel [C,4H], recurrent_kernel [H,4H], bias [4H]
//   -> outputs [N,T,H] (h at every step), h [N,H], c [N,H], workspace (for the gradient).
//
// Threads: the batch is cut into `shards` contiguous slices, each run single-threaded on its own
// worker thread; weight gradients are summed in shard order. Measured on 2 cores
// (docs/performance-engineering.md): two one-thread halves take half the time of one two-thread
// oneDNN call inside TensorFlow, whose OpenMP team spins against TensorFlow's own threads. A fixed shard count (not
// the machine's core count) keeps results identical from machine to machine.
//
// Built by `make install` (python -m mnist_lstm.onednn_build) against the venv's oneDNN, which
// passes the sha256 of this file as MNIST_LSTM_SOURCE_SHA256: the loader reads it back and never
// loads a library built from another version of this source.
#include <omp.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#ifndef MNIST_LSTM_SOURCE_SHA256
#error "build with `python -m mnist_lstm.onednn_build`, which defines MNIST_LSTM_SOURCE_SHA256"
#endif

// Kept in the binary (used) and exported, so the loader finds it in the file's bytes.
extern "C" __attribute__((used, visibility("default"))) const char kMnistLstmSourceHash[] =
    "mnist-lstm-onednn-source-sha256:" MNIST_LSTM_SOURCE_SHA256;

namespace {

using ::tensorflow::DT_UINT8;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using Status = ::absl::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
using tag = dnnl::memory::format_tag;

constexpr int kGates = 4;
constexpr size_t kAlign = 64;

// Persistent worker threads, one per shard, each running oneDNN on one OpenMP thread.
class ShardThreads {
 public:
  explicit ShardThreads(int count) : slots_(count) {
    for (int i = 0; i < count; ++i) threads_.emplace_back([this, i] { loop(i); });
  }

  // Runs tasks[i] on worker i, all at once, and waits for all; rethrows the first error.
  void run(const std::vector<std::function<void()>>& tasks) {
    std::lock_guard<std::mutex> one_batch_at_a_time(run_mu_);
    std::unique_lock<std::mutex> lock(mu_);
    pending_ = static_cast<int>(tasks.size());
    for (size_t i = 0; i < tasks.size(); ++i) slots_[i] = {&tasks[i], nullptr};
    wake_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    for (size_t i = 0; i < tasks.size(); ++i)
      if (slots_[i].error) std::rethrow_exception(slots_[i].error);
  }

 private:
  struct Slot {
    const std::function<void()>* task;
    std::exception_ptr error;
  };

  void loop(int i) {
    omp_set_num_threads(1);
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return slots_[i].task != nullptr; });
      const std::function<void()>* task = slots_[i].task;
      lock.unlock();
      std::exception_ptr error;
      try {
        (*task)();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      slots_[i] = {nullptr, error};
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<Slot> slots_;
  int pending_ = 0;
  std::vector<std::thread> threads_;
};

ShardThreads& shard_threads(int count) {
  // One pool per shard count, never destroyed: the threads live as long as the process.
  static std::mutex mu;
  static std::unordered_map<int, ShardThreads*> pools;
  std::lock_guard<std::mutex> lock(mu);
  auto& pool = pools[count];
  if (pool == nullptr) pool = new ShardThreads(count);
  return *pool;
}

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::desc f32(const dnnl::memory::dims& shape, tag format) {
  return dnnl::memory::desc(shape, dnnl::memory::data_type::f32, format);
}

// One problem size. Layer tensors are batch-major (ntc), as Keras passes them.
struct Shapes {
  int64_t n, t, c, h;
  dnnl::memory::desc layer_in() const { return f32({t, n, c}, tag::ntc); }
  dnnl::memory::desc layer_out() const { return f32({t, n, h}, tag::ntc); }
  dnnl::memory::desc state() const { return f32({1, 1, n, h}, tag::ldnc); }
  dnnl::memory::desc weights_layer(tag format) const { return f32({1, 1, c, kGates, h}, format); }
  dnnl::memory::desc weights_iter(tag format) const { return f32({1, 1, h, kGates, h}, format); }
  dnnl::memory::desc bias() const { return f32({1, 1, kGates, h}, tag::ldgo); }
  bool operator==(const Shapes& o) const { return n == o.n && t == o.t && c == o.c && h == o.h; }
};

struct ShapesHash {
  size_t operator()(const Shapes& s) const {
    return std::hash<int64_t>()(((s.n * 1009 + s.t) * 1009 + s.c) * 1009 + s.h);
  }
};

// Batch rows [begin, begin + n) of one shard.
struct Shard {
  int64_t begin, n;
};

std::vector<Shard> shards_of(int64_t batch, int count) {
  std::vector<Shard> shards;
  const int64_t used = std::max<int64_t>(1, std::min<int64_t>(count, batch));
  for (int64_t i = 0, begin = 0; i < used; ++i) {
    const int64_t n = batch / used + (i < batch % used ? 1 : 0);
    shards.push_back({begin, n});
    begin += n;
  }
  return shards;
}

dnnl::primitive_attr user_scratchpad() {
  // Each call gets its own scratchpad from TensorFlow: nothing shared between concurrent calls.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Training keeps the gates in a workspace for the gradient; inference (validation, predict) needs
// none: for a validation batch of 1,024 images that is ~140 MB less to allocate.
dnnl::lstm_forward::primitive_desc forward_desc(const Shapes& s, bool training = true) {
  return dnnl::lstm_forward::primitive_desc(
      cpu_engine(),
      training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference,
      dnnl::rnn_direction::unidirectional_left2right, s.layer_in(), s.state(), s.state(),
      s.weights_layer(tag::any), s.weights_iter(tag::any), s.bias(), s.layer_out(), s.state(),
      s.state(), user_scratchpad());
}

dnnl::lstm_backward::primitive_desc backward_desc(const Shapes& s) {
  return dnnl::lstm_backward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::backward, dnnl::rnn_direction::unidirectional_left2right,
      s.layer_in(), s.state(), s.state(), s.weights_layer(tag::any), s.weights_iter(tag::any),
      s.bias(), s.layer_out(), s.state(), s.state(), s.layer_in(), s.state(), s.state(),
      s.weights_layer(tag::any), s.weights_iter(tag::any), s.bias(), s.layer_out(), s.state(),
      s.state(), forward_desc(s), user_scratchpad());
}

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// A shard's rows of a batch-major tensor, as oneDNN memory described by the shard's `desc`.
dnnl::memory rows(const dnnl::memory::desc& desc, const Tensor& tensor, const Shard& shard) {
  char* base = const_cast<char*>(tensor.tensor_data().data());
  const size_t row_bytes = desc.get_size() / shard.n;
  return dnnl::memory(desc, cpu_engine(), base + shard.begin * row_bytes);
}

dnnl::memory whole(const dnnl::memory::desc& desc, const Tensor& tensor) {
  return dnnl::memory(desc, cpu_engine(), const_cast<char*>(tensor.tensor_data().data()));
}

// A byte buffer from TensorFlow's allocator, carved into 64-byte aligned oneDNN memories.
class Arena {
 public:
  Status allocate(OpKernelContext* ctx, size_t bytes) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        DT_UINT8, TensorShape({static_cast<int64_t>(bytes + kAlign)}), &buffer_));
    const auto start = reinterpret_cast<uintptr_t>(buffer_.tensor_data().data());
    next_ = reinterpret_cast<char*>((start + kAlign - 1) / kAlign * kAlign);
    return absl::OkStatus();
  }

  // Carves `tensor` (an output that outlives the call) instead of a temporary.
  void over(const Tensor& tensor) {
    const auto start = reinterpret_cast<uintptr_t>(tensor.tensor_data().data());
    next_ = reinterpret_cast<char*>((start + kAlign - 1) / kAlign * kAlign);
  }

  dnnl::memory take(const dnnl::memory::desc& desc) {
    dnnl::memory memory(desc, cpu_engine(), next_);
    next_ += aligned(desc.get_size());
    return memory;
  }

 private:
  Tensor buffer_;
  char* next_ = nullptr;
};

// Weights as oneDNN wants them: the plain memory when the layouts match, else a reordered copy.
dnnl::memory weights_in(dnnl::stream& stream, dnnl::memory plain,
                        const dnnl::memory::desc& wanted, Arena& arena) {
  if (plain.get_desc() == wanted) return plain;
  dnnl::memory copy = arena.take(wanted);
  dnnl::reorder(plain, copy).execute(stream, plain, copy);
  return copy;
}

// What both primitives read: the shard's rows of x, h0 and c0 (inputs 0-2), the kernel and
// recurrent kernel (inputs 3, 4) in the layouts primitive `pd` chose, and the bias (input 5).
template <typename PrimitiveDesc>
std::unordered_map<int, dnnl::memory> source_args(OpKernelContext* ctx, dnnl::stream& stream,
                                                  const Shapes& s, const Shard& shard,
                                                  const PrimitiveDesc& pd, Arena& arena) {
  const Tensor& kernel = ctx->input(3);
  const Tensor& recurrent_kernel = ctx->input(4);
  return {
      {DNNL_ARG_SRC_LAYER, rows(s.layer_in(), ctx->input(0), shard)},
      {DNNL_ARG_SRC_ITER, rows(s.state(), ctx->input(1), shard)},
      {DNNL_ARG_SRC_ITER_C, rows(s.state(), ctx->input(2), shard)},
      {DNNL_ARG_WEIGHTS_LAYER,
       weights_in(stream, whole(s.weights_layer(tag::ldigo), kernel), pd.weights_layer_desc(),
                  arena)},
      {DNNL_ARG_WEIGHTS_ITER,
       weights_in(stream, whole(s.weights_iter(tag::ldigo), recurrent_kernel),
                  pd.weights_iter_desc(), arena)},
      {DNNL_ARG_BIAS, whole(s.bias(), ctx->input(5))}};
}

size_t weights_bytes(const dnnl::memory::desc& a, const dnnl::memory::desc& b) {
  return aligned(a.get_size()) + aligned(b.get_size());
}

Status check_inputs(OpKernelContext* ctx) {
  const Tensor& x = ctx->input(0);
  const Tensor& kernel = ctx->input(3);
  const Tensor& recurrent = ctx->input(4);
  if (x.dims() != 3 || kernel.dims() != 2 || recurrent.dims() != 2 || ctx->input(5).dims() != 1)
    return absl::InvalidArgumentError(
        "OnednnLstm expects x [N,T,C], kernel [C,4H], recurrent_kernel [H,4H], bias [4H]");
  const int64_t h = recurrent.dim_size(0);
  if (kernel.dim_size(0) != x.dim_size(2) || kernel.dim_size(1) != kGates * h ||
      recurrent.dim_size(1) != kGates * h || ctx->input(5).dim_size(0) != kGates * h)
    return absl::InvalidArgumentError("OnednnLstm: weight shapes do not match x and H");
  return absl::OkStatus();
}

// Primitives for each shard size met, built once per kernel instance.
template <typename Desc, typename Primitive>
class Plans {
 public:
  struct Plan {
    Desc pd;
    Primitive primitive;
  };

  template <typename MakeDesc>
  const Plan& get(const Shapes& s, MakeDesc make_desc) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(s);
    if (it == plans_.end()) {
      Desc pd = make_desc(s);
      it = plans_.emplace(s, Plan{pd, Primitive(pd)}).first;
    }
    return it->second;
  }

 private:
  std::mutex mu_;
  std::unordered_map<Shapes, Plan, ShapesHash> plans_;
};

// The sizes the inputs give: x is [batch n, timesteps t, channels c], the recurrent kernel
// [units h, 4h].
Shapes input_shapes(OpKernelContext* ctx) {
  const Tensor& x = ctx->input(0);
  return {x.dim_size(0), x.dim_size(1), x.dim_size(2), ctx->input(4).dim_size(0)};
}

// Runs one task per shard on the shard threads; a oneDNN error fails the op.
void run_shards(OpKernelContext* ctx, int threads,
                const std::vector<std::function<void()>>& tasks) {
  try {
    shard_threads(threads).run(tasks);
  } catch (const dnnl::error& e) {
    ctx->CtxFailure(__FILE__, __LINE__,
                    absl::InternalError(std::string("oneDNN LSTM: ") + e.message));
  }
}

// Runs `body(i, shard, shapes, plan, stream, arena, workspace, args)` once per shard on the shard
// threads; `args` holds the source arguments every LSTM primitive takes, the body adds its own
// and executes the shard's primitive.
template <class Plan, class Body>
void for_each_shard(OpKernelContext* ctx, int threads, const std::vector<Shard>& shards,
                    const std::vector<const Plan*>& plans, std::vector<Arena>& temps,
                    Arena& workspaces, int64_t t, int64_t c, int64_t h, const Body& body) {
  std::vector<std::function<void()>> tasks;
  for (size_t i = 0; i < shards.size(); ++i) {
    const Shard shard = shards[i];
    const Plan& p = *plans[i];
    dnnl::memory ws = workspaces.take(p.pd.workspace_desc());
    tasks.push_back([&, i, shard, ws] {
      const Shapes s{shard.n, t, c, h};
      dnnl::stream stream(cpu_engine());
      Arena& arena = temps[i];
      auto args = source_args(ctx, stream, s, shard, p.pd, arena);
      body(i, shard, s, p, stream, arena, ws, args);
    });
  }
  run_shards(ctx, threads, tasks);
}

class OnednnLstmOp : public OpKernel {
 public:
  explicit OnednnLstmOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shards", &shards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &training_));
  }

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, check_inputs(ctx));
    const Shapes all = input_shapes(ctx);
    const int64_t n = all.n, t = all.t, c = all.c, h = all.h;
    const std::vector<Shard> shards = shards_of(n, shards_);

    std::vector<const Plan*> plans;
    std::vector<Arena> temps(shards.size());
    size_t workspace_bytes = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      const Plan& p = plans_.get({shards[i].n, t, c, h}, [this](const Shapes& s) {
        return forward_desc(s, training_);
      });
      plans.push_back(&p);
      workspace_bytes += aligned(p.pd.workspace_desc().get_size());
      OP_REQUIRES_OK(ctx, temps[i].allocate(
                              ctx, weights_bytes(p.pd.weights_layer_desc(),
                                                 p.pd.weights_iter_desc()) +
                                       aligned(p.pd.scratchpad_desc().get_size())));
    }
    Tensor *outputs, *h_out, *c_out, *workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t, h}), &outputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, h}), &h_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, h}), &c_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, TensorShape({static_cast<int64_t>(workspace_bytes + kAlign)}),
                            &workspace));
    Arena workspaces;
    workspaces.over(*workspace);

    auto run_forward = [&](size_t, const Shard& shard, const Shapes& s, const Plan& p,
                           dnnl::stream& stream, Arena& arena, const dnnl::memory& ws,
                           std::unordered_map<int, dnnl::memory>& args) {
      args.insert({{DNNL_ARG_DST_LAYER, rows(s.layer_out(), *outputs, shard)},
                   {DNNL_ARG_DST_ITER, rows(s.state(), *h_out, shard)},
                   {DNNL_ARG_DST_ITER_C, rows(s.state(), *c_out, shard)},
                   {DNNL_ARG_SCRATCHPAD, arena.take(p.pd.scratchpad_desc())}});
      if (training_) args.emplace(DNNL_ARG_WORKSPACE, ws);
      p.primitive.execute(stream, args);
      stream.wait();
    };
    for_each_shard(ctx, shards_, shards, plans, temps, workspaces, t, c, h, run_forward);
  }

 private:
  using Plan = Plans<dnnl::lstm_forward::primitive_desc, dnnl::lstm_forward>::Plan;
  int shards_;
  bool training_;
  Plans<dnnl::lstm_forward::primitive_desc, dnnl::lstm_forward> plans_;
};

class OnednnLstmGradOp : public OpKernel {
 public:
  explicit OnednnLstmGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shards", &shards_));
  }

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, check_inputs(ctx));
    const Shapes all = input_shapes(ctx);
    // Keras' layouts of the weight gradients.
    const dnnl::memory::desc kernel_md = all.weights_layer(tag::ldigo);
    const dnnl::memory::desc recurrent_md = all.weights_iter(tag::ldigo);
    const int64_t n = all.n, t = all.t, c = all.c, h = all.h;
    const std::vector<Shard> shards = shards_of(n, shards_);

    std::vector<const Plan*> plans;
    std::vector<Arena> temps(shards.size());
    for (size_t i = 0; i < shards.size(); ++i) {
      const Shapes s{shards[i].n, t, c, h};
      const Plan& p = plans_.get(s, backward_desc);
      plans.push_back(&p);
      // Per shard: weights and weight gradients in oneDNN's layouts and in Keras' (summed
      // afterwards), the bias gradient, the scratchpad.
      const size_t bytes =
          weights_bytes(p.pd.weights_layer_desc(), p.pd.weights_iter_desc()) +
          weights_bytes(p.pd.diff_weights_layer_desc(), p.pd.diff_weights_iter_desc()) +
          weights_bytes(kernel_md, recurrent_md) + aligned(s.bias().get_size()) +
          aligned(p.pd.scratchpad_desc().get_size());
      OP_REQUIRES_OK(ctx, temps[i].allocate(ctx, bytes));
    }
    Tensor* grads[6];
    for (int i = 0; i < 6; ++i)
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, ctx->input(i).shape(), &grads[i]));
    Arena workspaces;
    workspaces.over(ctx->input(9));

    std::vector<dnnl::memory> dkernels(shards.size()), drecurrents(shards.size()),
        dbiases(shards.size());
    auto run_backward = [&](size_t i, const Shard& shard, const Shapes& s, const Plan& p,
                            dnnl::stream& stream, Arena& arena, const dnnl::memory& ws,
                            std::unordered_map<int, dnnl::memory>& args) {
      dnnl::memory dlayer = arena.take(p.pd.diff_weights_layer_desc());
      dnnl::memory diter = arena.take(p.pd.diff_weights_iter_desc());
      dbiases[i] = arena.take(s.bias());
      // oneDNN adds the weight gradients to what the buffers hold: start them at zero.
      for (const dnnl::memory& m : {dlayer, diter, dbiases[i]})
        std::memset(m.get_data_handle(), 0, m.get_desc().get_size());
      args.insert(
          {{DNNL_ARG_DST_LAYER, rows(s.layer_out(), ctx->input(6), shard)},
           {DNNL_ARG_DST_ITER, rows(s.state(), ctx->input(7), shard)},
           {DNNL_ARG_DST_ITER_C, rows(s.state(), ctx->input(8), shard)},
           {DNNL_ARG_WORKSPACE, ws},
           {DNNL_ARG_DIFF_DST_LAYER, rows(s.layer_out(), ctx->input(10), shard)},
           {DNNL_ARG_DIFF_DST_ITER, rows(s.state(), ctx->input(11), shard)},
           {DNNL_ARG_DIFF_DST_ITER_C, rows(s.state(), ctx->input(12), shard)},
           {DNNL_ARG_DIFF_SRC_LAYER, rows(s.layer_in(), *grads[0], shard)},
           {DNNL_ARG_DIFF_SRC_ITER, rows(s.state(), *grads[1], shard)},
           {DNNL_ARG_DIFF_SRC_ITER_C, rows(s.state(), *grads[2], shard)},
           {DNNL_ARG_DIFF_WEIGHTS_LAYER, dlayer},
           {DNNL_ARG_DIFF_WEIGHTS_ITER, diter},
           {DNNL_ARG_DIFF_BIAS, dbiases[i]},
           {DNNL_ARG_SCRATCHPAD, arena.take(p.pd.scratchpad_desc())}});
      p.primitive.execute(stream, args);
      dkernels[i] = arena.take(kernel_md);
      drecurrents[i] = arena.take(recurrent_md);
      dnnl::reorder(dlayer, dkernels[i]).execute(stream, dlayer, dkernels[i]);
      dnnl::reorder(diter, drecurrents[i]).execute(stream, diter, drecurrents[i]);
      stream.wait();
    };
    for_each_shard(ctx, shards_, shards, plans, temps, workspaces, t, c, h, run_backward);
    if (!ctx->status().ok()) return;
    // Summed in shard order: the same bits whatever order the shards finished in.
    sum_into(*grads[3], dkernels);
    sum_into(*grads[4], drecurrents);
    sum_into(*grads[5], dbiases);
  }

 private:
  using Plan = Plans<dnnl::lstm_backward::primitive_desc, dnnl::lstm_backward>::Plan;

  static void sum_into(Tensor& out, const std::vector<dnnl::memory>& parts) {
    auto total = out.flat<float>();
    const auto* first = static_cast<const float*>(parts[0].get_data_handle());
    std::copy(first, first + total.size(), total.data());
    for (size_t k = 1; k < parts.size(); ++k) {
      const auto* part = static_cast<const float*>(parts[k].get_data_handle());
      for (int64_t j = 0; j < total.size(); ++j) total(j) += part[j];
    }
  }

  int shards_;
  Plans<dnnl::lstm_backward::primitive_desc, dnnl::lstm_backward> plans_;
};

Status forward_shapes(InferenceContext* c) {
  ShapeHandle x, recurrent;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &recurrent));
  DimensionHandle n = c->Dim(x, 0), t = c->Dim(x, 1), h = c->Dim(recurrent, 0);
  c->set_output(0, c->MakeShape({n, t, h}));
  c->set_output(1, c->MakeShape({n, h}));
  c->set_output(2, c->MakeShape({n, h}));
  c->set_output(3, c->Vector(InferenceContext::kUnknownDim));
  return absl::OkStatus();
}

Status gradient_shapes(InferenceContext* c) {
  for (int i = 0; i < 6; ++i) c->set_output(i, c->input(i));
  return absl::OkStatus();
}

// The forward op's attribute and inputs. Its gradient op takes the same ones first: TensorFlow
// hands a gradient function the forward op's inputs and outputs (onednn_lstm.py passes them on).
::tensorflow::register_op::OpDefBuilderWrapper lstm_op(const char* name) {
  ::tensorflow::register_op::OpDefBuilderWrapper op(name);
  op.Attr("shards: int >= 1 = 2")
      .Input("x: float")
      .Input("h0: float")
      .Input("c0: float")
      .Input("kernel: float")
      .Input("recurrent_kernel: float")
      .Input("bias: float");
  return op;
}

// What REGISTER_OP expands to, with the shared part built once by lstm_op.
const ::tensorflow::InitOnStartupMarker kForwardRegistered =
    ::tensorflow::InitOnStartupMarker{} << lstm_op("OnednnLstm")
                                               .Attr("training: bool = true")
                                               .Output("outputs: float")
                                               .Output("h: float")
                                               .Output("c: float")
                                               .Output("workspace: uint8")
                                               .SetShapeFn(forward_shapes);

const ::tensorflow::InitOnStartupMarker kGradientRegistered =
    ::tensorflow::InitOnStartupMarker{} << lstm_op("OnednnLstmGrad")
                                               .Input("outputs: float")
                                               .Input("h: float")
                                               .Input("c: float")
                                               .Input("workspace: uint8")
                                               .Input("d_outputs: float")
                                               .Input("d_h: float")
                                               .Input("d_c: float")
                                               .Output("dx: float")
                                               .Output("dh0: float")
                                               .Output("dc0: float")
                                               .Output("dkernel: float")
                                               .Output("drecurrent_kernel: float")
                                               .Output("dbias: float")
                                               .SetShapeFn(gradient_shapes);

}  // namespace

REGISTER_KERNEL_BUILDER(Name("OnednnLstm").Device(tensorflow::DEVICE_CPU), OnednnLstmOp);
REGISTER_KERNEL_BUILDER(Name("OnednnLstmGrad").Device(tensorflow::DEVICE_CPU), OnednnLstmGradOp);
