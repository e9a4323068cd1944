// The device-specific half of the weight streamer: where host and slot memory come from, and the
// copy engine with its "ready"/"free" events. The schedule (which layer goes into which slot, and
// when) lives in streamer.cpp and is the same for every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe_swap::streaming {

// One exact-size host allocation (one streamed layer's packed weights). Freed by the function
// that matches its allocator, whichever object outlives the other (views may hold it).
struct HostBlock {
  uint8_t* data = nullptr;
  size_t bytes = 0;
  void (*release)(void* data, size_t bytes) = nullptr;
  HostBlock(uint8_t* d, size_t n, void (*r)(void*, size_t)) : data(d), bytes(n), release(r) {}
  HostBlock(const HostBlock&) = delete;
  HostBlock& operator=(const HostBlock&) = delete;
  ~HostBlock() { if (data != nullptr) release(data, bytes); }
};

// Process-wide count of live host-store bytes and blocks (both backends), for leak tests.
void host_bytes_allocated(size_t bytes);
void host_bytes_freed(size_t bytes);
int64_t live_host_bytes();
int64_t live_host_blocks();

// "MemAvailable" from /proc/meminfo in bytes, or -1 when unknown; for allocation-failure messages.
int64_t host_memory_available();

// One contiguous piece of a layer copy: an expert's (or a run of small experts') w13 or w2 rows.
struct CopyChunk {
  const uint8_t* src;  // in the host store
  uint8_t* dst;        // in the slot
  size_t bytes;
};

// A whole-layer copy from the host store into a slot.
struct CopyPlan {
  int64_t layer;
  int slot;
  size_t bytes;
  std::vector<CopyChunk> chunks;
  bool inject_fault;  // test knob: this copy fails (see streamer_create's test_fail_copy_at)
};

enum class SpanKind : int64_t { kCopy = 0, kWait = 1, kHold = 2 };

// A finished span, in microseconds since the streamer was created.
struct Span {
  int64_t layer;
  int64_t slot;
  SpanKind kind;
  double start_us;
  double end_us;
};

class StreamBackend {
 public:
  virtual ~StreamBackend() = default;
  virtual c10::Device device() const = 0;

  // Exact-size host memory for the HostStore (pinned and mapped on CUDA). Throws, naming the bytes
  // asked for and the host memory available, when it can't.
  virtual std::shared_ptr<HostBlock> allocate_host(size_t bytes) = 0;
  // One scratch-ring slot ("device" memory).
  virtual at::Tensor allocate_slot(size_t bytes) = 0;

  // `full` mode: copy on the copy engine once the slot's "free" event (and the work issued so far
  // on the current stream) has completed, then mark the slot's "ready" event. Never blocks the
  // host. Throws when the copy can't be issued.
  virtual void issue_copy(const CopyPlan& plan) = 0;
  // The current stream waits for the slot's last issued copy (on CPU: the caller blocks), then
  // the layer's hold span begins. Throws the copy's error if it failed.
  virtual void wait_ready(int slot, int64_t layer) = 0;
  // `sync` mode (baseline): copy on the current stream itself, then the hold begins.
  virtual void copy_on_current_stream(const CopyPlan& plan) = 0;
  // `uva` mode (baseline): the hold begins with nothing to wait for.
  virtual void begin_hold(int64_t layer) = 0;
  // Record the slot's "free" event on the current stream (slot -1: uva, no slot) and end the hold.
  virtual void record_free(int slot, int64_t layer) = 0;
  // The host waits until every issued copy has landed and every recorded "free" has fired.
  virtual void drain() = 0;
  // Cost-model calibration (policy auto): the fastest of `repeats` runs of the plan's chunks on the
  // copy engine, in seconds, the host blocking until each run lands. Only while nothing is in flight.
  virtual double time_copy(const CopyPlan& plan, int repeats) = 0;
  // Move finished spans into `out`. block=false never waits on the device.
  virtual void collect(std::vector<Span>& out, bool block) = 0;
  // Spans that could not be timed (too many pending); reported, never waited for.
  virtual int64_t untimed_spans() const = 0;
  // A tensor on device() that reads host memory directly (`uva`); keeps `block` alive.
  virtual at::Tensor uva_view(const std::shared_ptr<HostBlock>& block, at::IntArrayRef sizes,
                              at::ScalarType dtype) = 0;
};

struct BackendOptions {
  int num_slots;
  bool trace;                  // record copy/wait/hold spans (on CUDA: timing events per span)
  bool timing;                 // time the waits (on CUDA: a pair of events per acquire)
  int64_t test_copy_delay_us;  // CPU test knob: random delay in [0, this] before each chunk
};

std::unique_ptr<StreamBackend> make_cpu_backend(const BackendOptions& options);
#ifdef MOE_SWAP_WITH_CUDA
std::unique_ptr<StreamBackend> make_cuda_backend(c10::Device device, const BackendOptions& options);
#endif

}  // namespace moe_swap::streaming
