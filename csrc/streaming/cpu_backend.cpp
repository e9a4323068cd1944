// The CPU backend: the same schedule as on a GPU, with ordinary memory for the "device" slots, a
// worker thread as the copy engine (its FIFO queue plays the copy stream) and per-channel fences
// (mutex + condition variable + sequence numbers) as the "ready" events.
//
// The "free" event needs no fence here: compute on CPU runs synchronously in the caller, so a slot
// is free the moment release() returns, and the placements only ever hand the engine unheld slots.
#include "streaming/backend.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

namespace moe_swap::streaming {

namespace {

using Clock = std::chrono::steady_clock;

void free_aligned(void* data, size_t bytes) {
  std::free(data);
  host_bytes_freed(bytes);
}

class CpuBackend final : public StreamBackend {
 public:
  explicit CpuBackend(const BackendOptions& options)
      : options_(options),
        epoch_(Clock::now()),
        issued_(options.num_channels, 0),
        landed_(options.num_channels, 0),
        failed_seq_(options.num_channels, 0),
        error_(options.num_channels) {
    worker_ = std::thread([this] { run_copy_engine(); });
  }

  ~CpuBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    worker_.join();  // the engine finishes every queued copy before it stops
  }

  c10::Device device() const override { return c10::Device(c10::kCPU); }

  std::shared_ptr<HostBlock> allocate_host(size_t bytes) override {
    void* data = nullptr;
    // Exact bytes (plain memory: pinning needs a driver, and the CPU path must not need one).
    if (posix_memalign(&data, 4096, bytes) != 0 || data == nullptr) {
      TORCH_CHECK(false, "HostStore: could not allocate ", bytes, " bytes of host memory (MemAvailable: ",
                  host_memory_available(), " bytes)");
    }
    host_bytes_allocated(bytes);
    return std::make_shared<HostBlock>(static_cast<uint8_t*>(data), bytes, &free_aligned);
  }

  at::Tensor allocate_slot(size_t bytes) override {
    return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  }

  void issue_copy(const CopyPlan& plan) override {
    std::lock_guard<std::mutex> lock(mu_);
    Job job{plan, ++issued_[plan.channel]};
    queue_.push_back(std::move(job));
    work_cv_.notify_one();
  }

  void wait_ready(int channel, int64_t layer) override {
    const auto t0 = Clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t want = issued_[channel];
    done_cv_.wait(lock, [&] { return landed_[channel] >= want; });
    const auto t1 = Clock::now();
    add_span(layer, channel, SpanKind::kWait, t0, t1);
    if (failed_seq_[channel] == want && want != 0) {
      TORCH_CHECK(false, error_[channel]);
    }
    if (options_.trace) hold_start_[layer] = t1;
  }

  void copy_on_current_stream(const CopyPlan& plan) override {
    const auto t0 = Clock::now();
    copy_chunks(plan);
    const auto t1 = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    add_span(plan.layer, plan.channel, SpanKind::kCopy, t0, t1);
    add_span(plan.layer, plan.channel, SpanKind::kWait, t0, t1);  // the compute "stream" waited for it
    if (options_.trace) hold_start_[plan.layer] = t1;
  }

  void begin_hold(int64_t layer) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (options_.trace) hold_start_[layer] = Clock::now();
  }

  void record_free(int channel, int64_t layer) override {
    const auto t = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = hold_start_.find(layer);
    if (options_.trace && it != hold_start_.end()) {
      add_span(layer, channel, SpanKind::kHold, it->second, t);
      hold_start_.erase(it);
    }
  }

  void drain() override {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return queue_.empty() && !busy_; });
  }

  double time_copy(const CopyPlan& plan, int repeats) override {
    drain();
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = Clock::now();
      for (const CopyChunk& c : plan.chunks) std::memcpy(c.dst, c.src, c.bytes);
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    }
    return best;
  }

  void collect(std::vector<Span>& out, bool /*block*/) override {
    std::lock_guard<std::mutex> lock(mu_);
    out.insert(out.end(), spans_.begin(), spans_.end());
    spans_.clear();
  }

  int64_t untimed_spans() const override { return 0; }

  at::Tensor uva_view(const std::shared_ptr<HostBlock>& block, at::IntArrayRef sizes,
                      at::ScalarType dtype) override {
    auto keep = block;
    return at::from_blob(block->data, sizes, [keep](void*) {},
                         at::TensorOptions().dtype(dtype).device(at::kCPU));
  }

  void set_test_copy_delay_us(int64_t us) override { copy_delay_us_ = us; }

 private:
  struct Job {
    CopyPlan plan;
    uint64_t seq;
  };

  // Caller holds mu_. Copy spans only when tracing; waits always (they are the statistics).
  void add_span(int64_t layer, int channel, SpanKind kind, Clock::time_point a, Clock::time_point b) {
    if (kind != SpanKind::kWait && !options_.trace) return;
    auto us = [&](Clock::time_point t) { return std::chrono::duration<double, std::micro>(t - epoch_).count(); };
    spans_.push_back(Span{layer, channel, kind, us(a), us(b)});
  }

  void copy_chunks(const CopyPlan& plan) {
    const int64_t delay_us = copy_delay_us_;
    for (const CopyChunk& c : plan.chunks) {
      if (delay_us > 0) {
        thread_local std::mt19937_64 rng(std::random_device{}());
        std::uniform_int_distribution<int64_t> delay(0, delay_us);
        std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
      }
      std::memcpy(c.dst, c.src, c.bytes);
    }
  }

  void run_copy_engine() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left in flight
      Job job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
      lock.unlock();
      const auto t0 = Clock::now();
      std::string error;
      if (job.plan.fail_for_test) {
        error = "copy of layer " + std::to_string(job.plan.layer) + " into slot " +
                std::to_string(job.plan.channel) + " failed: injected copy fault (test_fail_copy_at)";
      } else {
        copy_chunks(job.plan);
      }
      const auto t1 = Clock::now();
      lock.lock();
      busy_ = false;
      if (!error.empty()) {
        failed_seq_[job.plan.channel] = job.seq;
        error_[job.plan.channel] = std::move(error);
      } else {
        add_span(job.plan.layer, job.plan.channel, SpanKind::kCopy, t0, t1);
      }
      landed_[job.plan.channel] = job.seq;
      done_cv_.notify_all();
    }
  }

  const BackendOptions options_;
  const Clock::time_point epoch_;
  std::mutex mu_;
  std::condition_variable work_cv_;  // the engine waits for copies
  std::condition_variable done_cv_;  // callers wait for "ready"
  std::deque<Job> queue_;
  bool busy_ = false;
  bool stop_ = false;
  std::atomic<int64_t> copy_delay_us_{0};  // test hook, read by the engine thread
  std::vector<uint64_t> issued_;      // per channel: sequence number of the last copy issued
  std::vector<uint64_t> landed_;      // per channel: sequence number of the last copy finished
  std::vector<uint64_t> failed_seq_;  // per channel: sequence number of the last copy that failed
  std::vector<std::string> error_;
  std::unordered_map<int64_t, Clock::time_point> hold_start_;
  std::vector<Span> spans_;
  std::thread worker_;  // last: starts after every member above exists
};

}  // namespace

std::unique_ptr<StreamBackend> make_cpu_backend(const BackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace moe_swap::streaming
