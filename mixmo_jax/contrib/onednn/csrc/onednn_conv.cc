// A 2-D convolution and both its gradients through oneDNN, as XLA FFI
// handlers for jax's CPU backend (mixmo_jax/contrib/onednn/library.py builds
// this file at first use and registers the FFI targets "mixmo_onednn_conv",
// "mixmo_onednn_conv_dx" and "mixmo_onednn_conv_dw").
//
// For x [B, H, W, Ci] (NHWC), w [kh, kw, Ci, Co] (HWIO), strides (sh, sw)
// and padding (top, bottom, left, right) of x:
//
//   conv:  y[b, i, j, o] = sum_{p, q, c} x_pad[b, sh*i + p, sw*j + q, c]
//                                          w[p, q, c, o]   [B, Ho, Wo, Co]
//   dx:    the vjp of y with respect to x, from dy [B, Ho, Wo, Co]
//          (oneDNN's convolution_backward_data, any stride)
//   dw:    dw[p, q, c, o] = sum_{b, i, j} x_pad[b, sh*i + p, sw*j + q, c]
//                                          dy[b, i, j, o]  [kh, kw, Ci, Co]
//
// Activations are read and written where they lie (oneDNN's "nhwc" tag);
// the weights are reordered between HWIO and the layout oneDNN's kernel
// picks (its "any" tag), on every call (a weight is small next to the
// activations of a batch).
//
// Primitives are created once per shape and kept; executions from several
// XLA threads at once are safe (each call has its own stream, memory objects
// and scratchpad). oneDNN runs each call on `threads` OpenMP threads (the
// CPU's cores divided among jax's CPU devices, which run concurrently).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kConv = 0, kDx = 1, kDw = 2 };

// (kind, b, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pb, pl, pr).
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t>;

struct Plan {
  dnnl::primitive conv;
  // The kernel's weight layout; `reorder` moves weights between it and HWIO
  // (HWIO -> it for conv and dx, it -> HWIO for dw).
  dnnl::memory::desc weights, hwio, x, y;
  bool reorder;
  dnnl::reorder to_or_from_hwio;
  size_t scratch_bytes;
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

std::shared_ptr<const Plan> MakePlan(const Key& key) {
  auto [kind, b, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pb, pl, pr] = key;
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  auto plan = std::make_shared<Plan>();
  // oneDNN's logical dims are always (N, C, H, W) and (O, I, H, W); the tags
  // say how they lie in memory.
  plan->x = dnnl::memory::desc({b, ci, h, w}, dt::f32, tag::nhwc);
  plan->y = dnnl::memory::desc({b, co, ho, wo}, dt::f32, tag::nhwc);
  plan->hwio = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::hwio);
  auto any = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::memory::dims strides{sh, sw}, pad_lo{pt, pl}, pad_hi{pb, pr};
  auto fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, plan->x, any, plan->y, strides,
      pad_lo, pad_hi, attr);
  dnnl::memory::desc scratch;
  if (kind == kConv) {
    plan->weights = fwd.weights_desc();
    plan->conv = dnnl::convolution_forward(fwd);
    scratch = fwd.scratchpad_desc();
  } else if (kind == kDx) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, plan->x, any, plan->y,
        strides, pad_lo, pad_hi, fwd, attr);
    plan->weights = bwd.weights_desc();
    plan->conv = dnnl::convolution_backward_data(bwd);
    scratch = bwd.scratchpad_desc();
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, plan->x, any, plan->y,
        strides, pad_lo, pad_hi, fwd, attr);
    plan->weights = bwd.diff_weights_desc();
    plan->conv = dnnl::convolution_backward_weights(bwd);
    scratch = bwd.scratchpad_desc();
  }
  plan->scratch_bytes = scratch.get_size();
  plan->reorder = plan->weights != plan->hwio;
  if (plan->reorder) {
    auto pd = kind == kDw ? dnnl::reorder::primitive_desc(
                                Engine(), plan->weights, Engine(), plan->hwio,
                                attr)
                          : dnnl::reorder::primitive_desc(
                                Engine(), plan->hwio, Engine(), plan->weights,
                                attr);
    plan->to_or_from_hwio = dnnl::reorder(pd);
    plan->scratch_bytes =
        std::max(plan->scratch_bytes, pd.scratchpad_desc().get_size());
  }
  return plan;
}

std::shared_ptr<const Plan> GetPlan(const Key& key) {
  static std::mutex mutex;
  static auto* plans = new std::map<Key, std::shared_ptr<const Plan>>();
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = plans->find(key);
    if (it != plans->end()) return it->second;
  }
  auto plan = MakePlan(key);  // Outside the lock: it can take milliseconds.
  std::lock_guard<std::mutex> lock(mutex);
  return plans->emplace(key, plan).first->second;
}

struct Aligned {
  explicit Aligned(size_t bytes)
      : ptr(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr) {}
  ~Aligned() { std::free(ptr); }
  void* ptr;
};

struct Window {
  int64_t sh, sw, pt, pb, pl, pr, threads;
};

// Runs one of the three convolutions. x, y: the activations' buffers
// ([B, H, W, Ci] and [B, Ho, Wo, Co]); hwio: the weights' [kh, kw, Ci, Co].
// conv reads x and hwio and writes y; dx reads y (dy) and hwio and writes x
// (dx); dw reads x and y (dy) and writes hwio (dw).
ffi::Error Run(Kind kind, const char* name, float* x, ffi::Span<const int64_t> xd,
               float* y, ffi::Span<const int64_t> yd, float* hwio,
               ffi::Span<const int64_t> wd, const Window& win) {
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4 || xd[0] != yd[0] ||
      xd[3] != wd[2] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument(
        std::string(name) +
        ": expects x [B, H, W, Ci], y [B, Ho, Wo, Co], w [kh, kw, Ci, Co]");
  }
  // The calling thread's team size for the parallel regions oneDNN opens.
  if (win.threads > 0) omp_set_num_threads(static_cast<int>(win.threads));
  try {
    Key key{kind,   xd[0],  xd[1],  xd[2],  xd[3],  yd[1],  yd[2],  yd[3],
            wd[0],  wd[1],  win.sh, win.sw, win.pt, win.pb, win.pl, win.pr};
    auto plan = GetPlan(key);
    dnnl::stream stream(Engine());
    Aligned scratch(plan->scratch_bytes);
    dnnl::memory::desc scratch_md({static_cast<int64_t>(plan->scratch_bytes)},
                                  dnnl::memory::data_type::u8,
                                  dnnl::memory::format_tag::x);
    dnnl::memory scratch_m(scratch_md, Engine(), scratch.ptr);
    dnnl::memory xm(plan->x, Engine(), x), ym(plan->y, Engine(), y);
    dnnl::memory hwio_m(plan->hwio, Engine(), hwio);
    Aligned blocked_buf(plan->reorder ? plan->weights.get_size() : 0);
    dnnl::memory wm = plan->reorder
                          ? dnnl::memory(plan->weights, Engine(), blocked_buf.ptr)
                          : hwio_m;
    if (plan->reorder && kind != kDw) {
      plan->to_or_from_hwio.execute(stream, {{DNNL_ARG_FROM, hwio_m},
                                             {DNNL_ARG_TO, wm},
                                             {DNNL_ARG_SCRATCHPAD, scratch_m}});
    }
    if (kind == kConv) {
      plan->conv.execute(stream, {{DNNL_ARG_SRC, xm},
                                  {DNNL_ARG_WEIGHTS, wm},
                                  {DNNL_ARG_DST, ym},
                                  {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (kind == kDx) {
      plan->conv.execute(stream, {{DNNL_ARG_DIFF_DST, ym},
                                  {DNNL_ARG_WEIGHTS, wm},
                                  {DNNL_ARG_DIFF_SRC, xm},
                                  {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      plan->conv.execute(stream, {{DNNL_ARG_SRC, xm},
                                  {DNNL_ARG_DIFF_DST, ym},
                                  {DNNL_ARG_DIFF_WEIGHTS, wm},
                                  {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (plan->reorder) {
        plan->to_or_from_hwio.execute(stream,
                                      {{DNNL_ARG_FROM, wm},
                                       {DNNL_ARG_TO, hwio_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Conv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, int64_t stride_h,
                int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                int64_t pad_left, int64_t pad_right, int64_t threads) {
  return Run(kConv, "mixmo_onednn_conv", const_cast<float*>(x.typed_data()),
             x.dimensions(), y->typed_data(), y->dimensions(),
             const_cast<float*>(w.typed_data()), w.dimensions(),
             {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
              threads});
}

ffi::Error ConvDx(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h,
                  int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                  int64_t pad_left, int64_t pad_right, int64_t threads) {
  return Run(kDx, "mixmo_onednn_conv_dx", dx->typed_data(), dx->dimensions(),
             const_cast<float*>(dy.typed_data()), dy.dimensions(),
             const_cast<float*>(w.typed_data()), w.dimensions(),
             {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
              threads});
}

ffi::Error ConvDw(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                  ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                  int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                  int64_t pad_left, int64_t pad_right, int64_t threads) {
  return Run(kDw, "mixmo_onednn_conv_dw", const_cast<float*>(x.typed_data()),
             x.dimensions(), const_cast<float*>(dy.typed_data()),
             dy.dimensions(), dw->typed_data(), dw->dimensions(),
             {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
              threads});
}

}  // namespace

#define MIXMO_BIND                   \
  ffi::Ffi::Bind()                   \
      .Arg<ffi::Buffer<ffi::F32>>()  \
      .Arg<ffi::Buffer<ffi::F32>>()  \
      .Ret<ffi::Buffer<ffi::F32>>()  \
      .Attr<int64_t>("stride_h")     \
      .Attr<int64_t>("stride_w")     \
      .Attr<int64_t>("pad_top")      \
      .Attr<int64_t>("pad_bottom")   \
      .Attr<int64_t>("pad_left")     \
      .Attr<int64_t>("pad_right")    \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixmoOnednnConv, Conv, MIXMO_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MixmoOnednnConvDx, ConvDx, MIXMO_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MixmoOnednnConvDw, ConvDw, MIXMO_BIND);

// The oneDNN version this library runs, for the Python side's log:
// major * 10000 + minor * 100 + patch.
extern "C" int MixmoOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
