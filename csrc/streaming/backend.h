// The device-specific half of the streamer's mechanism core: where host and device memory come from,
// and the copy engine with a "ready"/"free" event pair per channel. Which bytes go where, and when, is
// a placement's (ring_placement.cpp, expert_cache_placement.cpp) and the same for every backend.
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

// One contiguous piece of a copy: an expert's (or a run of neighbouring experts') bytes of one bank.
struct CopyChunk {
  const uint8_t* src;  // in the host store
  uint8_t* dst;        // in device memory (a ring slot or pool slots)
  size_t bytes;
};

// One copy from the host store to the device, issued on one channel: its "ready" event marks the
// copy landed, its "free" event the compute that last read the destination done.
struct CopyPlan {
  int64_t layer;
  int channel = 0;
  size_t bytes = 0;
  std::vector<CopyChunk> chunks;
  // Set only by the copy engine from the test hooks (testing_set_hooks' fail_copy_at): this copy fails.
  bool fail_for_test = false;
};

enum class SpanKind : int64_t { kCopy = 0, kWait = 1, kHold = 2 };

// A finished span, in microseconds since the streamer was created.
struct Span {
  int64_t layer;
  int64_t slot;  // the channel it ran on (a ring slot's own channel, or demand/ahead), -1 none
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
  // Device memory (the ring's slots, the expert pool).
  virtual at::Tensor allocate_slot(size_t bytes) = 0;

  // Copy on the copy engine once the channel's "free" event (and the work issued so far on the
  // current stream) has completed, then mark the channel's "ready" event. Never blocks the host.
  // Throws when the copy can't be issued.
  virtual void issue_copy(const CopyPlan& plan) = 0;
  // The current stream waits for the channel's last issued copy (on CPU: the caller blocks), then
  // the layer's hold span begins. Throws the copy's error if it failed.
  virtual void wait_ready(int channel, int64_t layer) = 0;
  // `sync` mode (baseline): copy on the current stream itself, then the hold begins.
  virtual void copy_on_current_stream(const CopyPlan& plan) = 0;
  // `uva` mode (baseline): the hold begins with nothing to wait for.
  virtual void begin_hold(int64_t layer) = 0;
  // Record the channel's "free" event on the current stream (-1: none, e.g. uva) and end the hold.
  virtual void record_free(int channel, int64_t layer) = 0;
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
  // Test hook (testing_set_hooks; CPU backend only, others throw): a random delay in [0, us] before
  // each chunk, so that tests see copies still in flight.
  virtual void set_test_copy_delay_us(int64_t us) = 0;
};

struct BackendOptions {
  int num_channels;  // "ready"/"free" event pairs: one per ring slot, or demand + ahead
  bool trace;        // record copy/wait/hold spans (on CUDA: timing events per span)
  bool timing;       // time the waits (on CUDA: a pair of events per acquire)
};

std::unique_ptr<StreamBackend> make_cpu_backend(const BackendOptions& options);
#ifdef MOE_SWAP_WITH_CUDA
std::unique_ptr<StreamBackend> make_cuda_backend(c10::Device device, const BackendOptions& options);
#endif

}  // namespace moe_swap::streaming
