// The weight gradient of a 2-D convolution through oneDNN, as an XLA FFI
// handler for jax's CPU backend (mixmo_jax/models/onednn_dw.py builds this
// file at first use and registers it as the FFI target "mixmo_onednn_conv_dw").
//
// For x [B, H, W, Ci] (NHWC), the output gradient dy [B, Ho, Wo, Co] and the
// padding (top, bottom, left, right) and strides (sh, sw) of the forward conv
//
//   dw[p, q, c, o] = sum_{b, i, j} x_pad[b, sh*i + p, sw*j + q, c] dy[b, i, j, o]
//
// [kh, kw, Ci, Co] (HWIO), with oneDNN's convolution_backward_weights
// primitive reading x and dy where they are (oneDNN's "nhwc" tag) and writing
// its own weight layout, reordered into dw. XLA's own weight gradient
// transposes both operands first (to [Ci, H, W, B] and [H, W, B, Co]).
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

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t>;

struct Plan {
  dnnl::memory::desc src, diff_dst, diff_weights, hwio;
  dnnl::convolution_backward_weights conv;
  bool reorder;  // diff_weights is not HWIO: reorder into dw.
  dnnl::reorder to_hwio;
  size_t scratch_bytes;
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

std::shared_ptr<const Plan> MakePlan(const Key& key) {
  auto [b, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pb, pl, pr] = key;
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  auto plan = std::make_shared<Plan>();
  // oneDNN's logical dims are always (N, C, H, W) and (O, I, H, W); the tags
  // say how they lie in memory.
  plan->src = dnnl::memory::desc({b, ci, h, w}, dt::f32, tag::nhwc);
  plan->diff_dst = dnnl::memory::desc({b, co, ho, wo}, dt::f32, tag::nhwc);
  plan->hwio = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::hwio);
  auto any = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::memory::dims strides{sh, sw}, pad_lo{pt, pl}, pad_hi{pb, pr};
  auto fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, plan->src, any, plan->diff_dst,
      strides, pad_lo, pad_hi);
  auto bwd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, plan->src, any,
      plan->diff_dst, strides, pad_lo, pad_hi, fwd, attr);
  plan->diff_weights = bwd.diff_weights_desc();
  plan->conv = dnnl::convolution_backward_weights(bwd);
  plan->scratch_bytes = bwd.scratchpad_desc().get_size();
  plan->reorder = plan->diff_weights != plan->hwio;
  if (plan->reorder) {
    auto pd = dnnl::reorder::primitive_desc(Engine(), plan->diff_weights,
                                            Engine(), plan->hwio, attr);
    plan->to_hwio = dnnl::reorder(pd);
    plan->scratch_bytes = std::max(plan->scratch_bytes,
                                   pd.scratchpad_desc().get_size());
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

ffi::Error ConvDw(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                  ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                  int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                  int64_t pad_left, int64_t pad_right, int64_t threads) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4 || xd[0] != yd[0] ||
      xd[3] != wd[2] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument(
        "mixmo_onednn_conv_dw: expects x [B, H, W, Ci], dy [B, Ho, Wo, Co], "
        "dw [kh, kw, Ci, Co]");
  }
  // The calling thread's team size for the parallel regions oneDNN opens.
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  try {
    Key key{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
            stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
    auto plan = GetPlan(key);
    dnnl::stream stream(Engine());
    Aligned scratch(plan->scratch_bytes);
    dnnl::memory::desc scratch_md({static_cast<int64_t>(plan->scratch_bytes)},
                                  dnnl::memory::data_type::u8,
                                  dnnl::memory::format_tag::x);
    dnnl::memory scratch_m(scratch_md, Engine(), scratch.ptr);
    dnnl::memory src(plan->src, Engine(), const_cast<float*>(x.typed_data()));
    dnnl::memory diff_dst(plan->diff_dst, Engine(),
                          const_cast<float*>(dy.typed_data()));
    dnnl::memory out(plan->hwio, Engine(), dw->typed_data());
    if (!plan->reorder) {
      plan->conv.execute(stream, {{DNNL_ARG_SRC, src},
                                  {DNNL_ARG_DIFF_DST, diff_dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, out},
                                  {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      Aligned blocked_buf(plan->diff_weights.get_size());
      dnnl::memory blocked(plan->diff_weights, Engine(), blocked_buf.ptr);
      plan->conv.execute(stream, {{DNNL_ARG_SRC, src},
                                  {DNNL_ARG_DIFF_DST, diff_dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, blocked},
                                  {DNNL_ARG_SCRATCHPAD, scratch_m}});
      plan->to_hwio.execute(stream, {{DNNL_ARG_FROM, blocked},
                                     {DNNL_ARG_TO, out},
                                     {DNNL_ARG_SCRATCHPAD, scratch_m}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("mixmo_onednn_conv_dw: ") +
                                e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixmoOnednnConvDw, ConvDw,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("threads"));

// The oneDNN version this library runs, for the Python side's log:
// major * 10000 + minor * 100 + patch.
extern "C" int MixmoOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
