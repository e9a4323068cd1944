// The CUDA backend of the weight streamer: pinned exact-size host memory (cudaHostAlloc), slots from
// torch's caching allocator, copies on a dedicated non-blocking stream with per-channel "ready" and
// "free" events. No host-device synchronisation anywhere in acquire/prefetch/release: timings are
// CUDA events read lazily (cudaEventQuery) and in stats(); only drain() (destroy, synchronize,
// re-sizing the ring) waits on the host.
//
// NOTE: written without a GPU to run on; every runtime call is checked so a first run says plainly
// what went wrong.
#include "streaming/backend.h"

#include "core/checks.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <deque>
#include <unordered_map>
#include <vector>

namespace moe_swap::streaming {

namespace {

void free_pinned(void* data, size_t bytes) {
  // Kernels may still read this memory through its device mapping (mode uva's views, expert_cache_pull
  // on the device ids path), queued before the last reference went. The CUDA documentation does not
  // say that cudaFreeHost waits for them, so the device is synchronised first -- a block is freed when a
  // streamer closes, rarely -- except while the current stream captures a graph (a synchronisation
  // there is illegal; nothing captured reads a block that is being freed).
  try {  // a destructor's path (also at interpreter exit): nothing may escape
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &capture);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // this call's own error, not sticky
    } else if (capture == cudaStreamCaptureStatusNone) {
      C10_CUDA_CHECK_WARN(cudaDeviceSynchronize());
    }
  } catch (const std::exception& e) {
    TORCH_WARN("WeightStreamer (CUDA): could not wait for the device before freeing pinned memory: ", e.what());
  }
  C10_CUDA_CHECK_WARN(cudaFreeHost(data));
  host_bytes_freed(bytes);
}

// Debug mode (MOE_SWAP_DEBUG=1 / set_debug): the host waits for a copy right after issuing it, so a
// copy that faults is named here rather than at some later, unrelated synchronisation.
void debug_wait_for_copy(cudaStream_t stream, const CopyPlan& plan) {
  if (!debug_sync_now()) return;
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "copy of layer ", plan.layer, " (channel ", plan.channel, ", ", plan.chunks.size(),
                " chunks, ", plan.bytes, " bytes) failed: ", cudaGetErrorString(err));
  }
}

// Pending timing spans beyond this many are not timed (counted in untimed_spans) rather than waited for.
constexpr size_t kMaxTimingEvents = 4096;

// "cuda" means the current device; and a clear error for a device that isn't there.
c10::Device resolve_device(c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "the CUDA backend needs a CUDA device, got ", device.str());
  int count = 0;
  C10_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (!device.has_index()) device = c10::Device(c10::kCUDA, c10::cuda::current_device());
  TORCH_CHECK(device.index() < count, "device ", device.str(), " does not exist: ", count, " CUDA device(s) visible");
  return device;
}

class CudaBackend final : public StreamBackend {
 public:
  CudaBackend(c10::Device device, const BackendOptions& options)
      : device_(resolve_device(device)), options_(options) {
    c10::cuda::CUDAGuard guard(device_);
    try {
      // Its own stream, not one from torch's pool: pool streams are shared round-robin, and another
      // user's work on it would delay our copies.
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
      ready_.assign(options.num_channels, nullptr);
      free_.assign(options.num_channels, nullptr);
      for (int i = 0; i < options.num_channels; ++i) {
        C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready_[i], cudaEventDisableTiming));
        C10_CUDA_CHECK(cudaEventCreateWithFlags(&free_[i], cudaEventDisableTiming));
      }
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
      if (options.timing) {
        C10_CUDA_CHECK(cudaEventCreate(&epoch_));
        C10_CUDA_CHECK(cudaEventRecord(epoch_, copy_stream_));
      }
    } catch (...) {
      destroy_handles();
      throw;
    }
  }

  ~CudaBackend() override {
    c10::cuda::CUDAGuard guard(device_);
    try {
      drain();
    } catch (const std::exception& e) {
      TORCH_WARN("WeightStreamer (CUDA): error while draining copies at destruction: ", e.what());
    }
    destroy_handles();
  }

  c10::Device device() const override { return device_; }

  std::shared_ptr<HostBlock> allocate_host(size_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    void* data = nullptr;
    // Exactly `bytes` (torch's caching host allocator would round up to a power of two), mapped so
    // the uva baseline can hand kernels a device pointer to it, portable across devices.
    const cudaError_t err = cudaHostAlloc(&data, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it so later launches don't report it
      TORCH_CHECK(false, "HostStore: could not allocate ", bytes, " bytes of pinned host memory (",
                  cudaGetErrorString(err), "; MemAvailable: ", host_memory_available(), " bytes)");
    }
    host_bytes_allocated(bytes);
    return std::make_shared<HostBlock>(static_cast<uint8_t*>(data), bytes, &free_pinned);
  }

  at::Tensor allocate_slot(size_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device_));
  }

  void issue_copy(const CopyPlan& plan) override {
    c10::cuda::CUDAGuard guard(device_);
    TORCH_CHECK(!plan.fail_for_test, "copy of layer ", plan.layer, " into slot ", plan.channel,
                " failed: injected copy fault (test_fail_copy_at)");
    cudaStream_t compute = current_stream();
    // Fork the copy stream from the current stream (and from the channel's last reader): ordered after
    // the compute that read the slot, and joined to the current stream so a CUDA graph capture can
    // follow it. In the steady state the channel's "free" event is already the later of the two.
    C10_CUDA_CHECK(cudaEventRecord(fork_, compute));
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, fork_, 0));
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, free_[plan.channel], 0));
    cudaEvent_t start = options_.trace ? record_timing_event(copy_stream_) : nullptr;
    for (const CopyChunk& c : plan.chunks) {
      C10_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyHostToDevice, copy_stream_));
    }
    C10_CUDA_CHECK(cudaEventRecord(ready_[plan.channel], copy_stream_));
    if (start != nullptr) end_span(plan.layer, plan.channel, 1u << int(SpanKind::kCopy), start, copy_stream_);
    debug_wait_for_copy(copy_stream_, plan);
  }

  void wait_ready(int channel, int64_t layer) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t compute = current_stream();
    cudaEvent_t before = options_.timing ? record_timing_event(compute) : nullptr;
    C10_CUDA_CHECK(cudaStreamWaitEvent(compute, ready_[channel], 0));
    if (before != nullptr) end_span(layer, channel, 1u << int(SpanKind::kWait), before, compute);
    begin_hold(layer);
  }

  void copy_on_current_stream(const CopyPlan& plan) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t compute = current_stream();
    cudaEvent_t start = options_.timing ? record_timing_event(compute) : nullptr;
    for (const CopyChunk& c : plan.chunks) {
      C10_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyHostToDevice, compute));
    }
    debug_wait_for_copy(compute, plan);
    // The compute stream itself did the copy: that time is both a copy span and a wait.
    if (start != nullptr) {
      end_span(plan.layer, plan.channel, (1u << int(SpanKind::kCopy)) | (1u << int(SpanKind::kWait)), start, compute);
    }
    begin_hold(plan.layer);
  }

  void begin_hold(int64_t layer) override {
    if (!options_.trace) return;
    c10::cuda::CUDAGuard guard(device_);
    cudaEvent_t start = record_timing_event(current_stream());
    if (start == nullptr) return;
    auto [it, fresh] = hold_start_.try_emplace(layer, start);
    if (!fresh) {
      // Begun again before its release (on_demand waits on the prediction channel, then the demand
      // channel): the later start counts, as on the CPU backend, and the earlier event is reused
      // rather than lost (a lost event is never destroyed and counts against kMaxTimingEvents).
      spare_events_.push_back(it->second);
      it->second = start;
    }
  }

  void record_free(int channel, int64_t layer) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t compute = current_stream();
    if (channel >= 0) C10_CUDA_CHECK(cudaEventRecord(free_[channel], compute));
    auto it = hold_start_.find(layer);
    if (it != hold_start_.end()) {
      end_span(layer, channel, 1u << int(SpanKind::kHold), it->second, compute);
      hold_start_.erase(it);
    }
  }

  void drain() override {
    c10::cuda::CUDAGuard guard(device_);
    if (copy_stream_ != nullptr) C10_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
    for (cudaEvent_t ev : free_) {
      if (ev != nullptr) C10_CUDA_CHECK(cudaEventSynchronize(ev));
    }
  }

  double time_copy(const CopyPlan& plan, int repeats) override {
    c10::cuda::CUDAGuard guard(device_);
    drain();
    // Ordered after the work queued so far on the current stream, like every copy (issue_copy): the
    // destination was just allocated there, and torch's caching allocator hands out a block freed on
    // that stream while kernels queued before the free may still read or write it.
    C10_CUDA_CHECK(cudaEventRecord(fork_, current_stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, fork_, 0));
    cudaEvent_t start = nullptr, end = nullptr;
    C10_CUDA_CHECK(cudaEventCreate(&start));
    double best = 1e30;
    try {
      C10_CUDA_CHECK(cudaEventCreate(&end));
      for (int r = 0; r < repeats; ++r) {
        // device-side time of back-to-back copies on the copy stream: what a step's copies cost
        C10_CUDA_CHECK(cudaEventRecord(start, copy_stream_));
        for (const CopyChunk& c : plan.chunks) {
          C10_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyHostToDevice, copy_stream_));
        }
        C10_CUDA_CHECK(cudaEventRecord(end, copy_stream_));
        C10_CUDA_CHECK(cudaEventSynchronize(end));
        float ms = 0.f;
        C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, end));
        best = std::min(best, static_cast<double>(ms) * 1e-3);
      }
    } catch (...) {
      C10_CUDA_CHECK_WARN(cudaEventDestroy(start));
      if (end != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(end));
      throw;
    }
    C10_CUDA_CHECK(cudaEventDestroy(start));
    C10_CUDA_CHECK(cudaEventDestroy(end));
    return best;
  }

  void collect(std::vector<Span>& out, bool block) override {
    c10::cuda::CUDAGuard guard(device_);
    std::deque<Pending> still_pending;
    for (const Pending& p : pending_) {
      if (block) {
        C10_CUDA_CHECK(cudaEventSynchronize(p.end));
      } else {
        const cudaError_t err = cudaEventQuery(p.end);
        if (err == cudaErrorNotReady) {
          (void)cudaGetLastError();  // "not ready" is an answer, not an error: don't leave it behind
          still_pending.push_back(p);
          continue;
        }
        C10_CUDA_CHECK(err);
      }
      float start_ms = 0.f, end_ms = 0.f;
      C10_CUDA_CHECK(cudaEventElapsedTime(&start_ms, epoch_, p.start));
      C10_CUDA_CHECK(cudaEventElapsedTime(&end_ms, epoch_, p.end));
      for (int kind = 0; kind < 3; ++kind) {
        if (p.kinds & (1u << kind)) {
          out.push_back(Span{p.layer, p.slot, static_cast<SpanKind>(kind), start_ms * 1e3, end_ms * 1e3});
        }
      }
      spare_events_.push_back(p.start);
      spare_events_.push_back(p.end);
    }
    pending_.swap(still_pending);
  }

  int64_t untimed_spans() const override { return untimed_; }

  at::Tensor uva_view(const std::shared_ptr<HostBlock>& block, at::IntArrayRef sizes, at::ScalarType dtype) override {
    c10::cuda::CUDAGuard guard(device_);
    void* device_ptr = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, block->data, 0));
    auto keep = block;  // the host memory lives as long as any view of it
    // target_device given: from_blob need not ask the driver which device the pointer belongs to.
    return at::from_blob(device_ptr, sizes, [keep](void*) {}, at::TensorOptions().dtype(dtype).device(device_),
                         device_);
  }

  void set_test_copy_delay_us(int64_t us) override {
    TORCH_CHECK(us == 0, "test_copy_delay_us is a test hook of the CPU backend; got ", us, " for device ",
                device_.str());
  }

 private:
  struct Pending {
    int64_t layer;
    int64_t slot;
    unsigned kinds;  // bit per SpanKind
    cudaEvent_t start;
    cudaEvent_t end;
  };

  cudaStream_t current_stream() const { return at::cuda::getCurrentCUDAStream(device_.index()).stream(); }

  // A timing event recorded on `stream`, or nullptr when too many are pending (that span goes untimed).
  cudaEvent_t record_timing_event(cudaStream_t stream) {
    cudaEvent_t ev = nullptr;
    if (!spare_events_.empty()) {
      ev = spare_events_.back();
      spare_events_.pop_back();
    } else if (events_created_ < kMaxTimingEvents) {
      C10_CUDA_CHECK(cudaEventCreate(&ev));
      ++events_created_;
    } else {
      ++untimed_;
      return nullptr;
    }
    C10_CUDA_CHECK(cudaEventRecord(ev, stream));
    return ev;
  }

  void end_span(int64_t layer, int64_t slot, unsigned kinds, cudaEvent_t start, cudaStream_t stream) {
    cudaEvent_t end = record_timing_event(stream);
    if (end == nullptr) {
      spare_events_.push_back(start);
      return;
    }
    pending_.push_back(Pending{layer, slot, kinds, start, end});
  }

  void destroy_handles() {
    for (const Pending& p : pending_) {
      C10_CUDA_CHECK_WARN(cudaEventDestroy(p.start));
      C10_CUDA_CHECK_WARN(cudaEventDestroy(p.end));
    }
    pending_.clear();
    for (auto& kv : hold_start_) C10_CUDA_CHECK_WARN(cudaEventDestroy(kv.second));
    hold_start_.clear();
    for (cudaEvent_t ev : spare_events_) C10_CUDA_CHECK_WARN(cudaEventDestroy(ev));
    spare_events_.clear();
    for (std::vector<cudaEvent_t>* list : {&ready_, &free_}) {
      for (cudaEvent_t ev : *list) {
        if (ev != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(ev));
      }
      list->clear();
    }
    if (fork_ != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(fork_));
    if (epoch_ != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(epoch_));
    if (copy_stream_ != nullptr) C10_CUDA_CHECK_WARN(cudaStreamDestroy(copy_stream_));
    fork_ = epoch_ = nullptr;
    copy_stream_ = nullptr;
  }

  const c10::Device device_;
  const BackendOptions options_;
  cudaStream_t copy_stream_ = nullptr;
  std::vector<cudaEvent_t> ready_;  // per channel: its last copy has landed
  std::vector<cudaEvent_t> free_;   // per channel: the compute that read its slots has finished
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t epoch_ = nullptr;     // time zero of every span
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  std::unordered_map<int64_t, cudaEvent_t> hold_start_;
  size_t events_created_ = 0;
  int64_t untimed_ = 0;
};

}  // namespace

std::unique_ptr<StreamBackend> make_cuda_backend(c10::Device device, const BackendOptions& options) {
  return std::make_unique<CudaBackend>(device, options);
}

}  // namespace moe_swap::streaming
