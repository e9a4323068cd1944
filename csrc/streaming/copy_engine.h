// The copy engine of the mechanism core: a backend's copy stream (or copy thread) with named channels,
// each a "ready"/"free" event pair. A placement issues a CopyPlan on a channel and later makes the
// current stream wait for that channel; one engine runs every channel's copies in issue order. The
// engine also keeps the per-layer copy counts and applies the test hooks (testing_set_hooks), so
// neither the placements nor the backends see a test knob.
#pragma once

#include "streaming/backend.h"
#include "streaming/stats.h"

#include <memory>
#include <vector>

namespace moe_swap::streaming {

// The channels of an expert-granular placement (a ring instead gives each slot its own channel):
// a step's routed misses on one, copies ahead of a later step (predictions, the next layer whole) on
// the other, so that a step waits for its own copies without waiting for the guesses issued after them.
constexpr int kDemandChannel = 0;
constexpr int kAheadChannel = 1;
constexpr int kExpertChannels = 2;

// Test-only behaviour, set through the moe_swap_testing ops, never by a user-facing argument.
struct TestHooks {
  int64_t fail_copy_at = -1;  // the copy with this index (0-based, every issued copy) fails
};

class CopyEngine {
 public:
  CopyEngine(std::unique_ptr<StreamBackend> backend, std::vector<LayerStats>& stats)
      : backend_(std::move(backend)), stats_(stats) {}

  StreamBackend& backend() { return *backend_; }
  c10::Device device() const { return backend_->device(); }

  // Count the copy against its layer and issue it on `channel` (asynchronously, see StreamBackend).
  void issue(CopyPlan& plan, int channel) {
    account(plan, channel);
    backend_->issue_copy(plan);
  }
  // The same copy on the current stream (the sync baseline): the hold begins after it.
  void copy_on_current_stream(CopyPlan& plan, int channel);
  void wait(int channel, int64_t layer) { backend_->wait_ready(channel, layer); }
  void release(int channel, int64_t layer) { backend_->record_free(channel, layer); }
  void begin_hold(int64_t layer) { backend_->begin_hold(layer); }
  void drain() { backend_->drain(); }

  void set_test_hooks(const TestHooks& hooks, int64_t copy_delay_us);

  // The backend goes first (its thread joins / its stream is destroyed), before the memory it copies.
  void shut_down() { backend_.reset(); }

 private:
  void account(CopyPlan& plan, int channel);

  std::unique_ptr<StreamBackend> backend_;
  std::vector<LayerStats>& stats_;
  TestHooks hooks_;
  int64_t copies_issued_ = 0;
};

}  // namespace moe_swap::streaming
