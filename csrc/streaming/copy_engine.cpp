#include "streaming/copy_engine.h"

#include <c10/util/Exception.h>

namespace moe_swap::streaming {

void CopyEngine::account(CopyPlan& plan, int channel) {
  plan.channel = channel;
  plan.fail_for_test = copies_issued_ == hooks_.fail_copy_at;
  ++copies_issued_;
  LayerStats& st = stats_[plan.layer];
  st.bytes_copied += static_cast<int64_t>(plan.bytes);
  st.copies_issued += 1;
  st.chunks_issued += static_cast<int64_t>(plan.chunks.size());
}

void CopyEngine::copy_on_current_stream(CopyPlan& plan, int channel) {
  account(plan, channel);
  TORCH_CHECK(!plan.fail_for_test, "copy of layer ", plan.layer, " into slot ", channel,
              " failed: injected copy fault (test_fail_copy_at)");
  backend_->copy_on_current_stream(plan);
}

void CopyEngine::set_test_hooks(const TestHooks& hooks, int64_t copy_delay_us) {
  TORCH_CHECK(copy_delay_us >= 0 && copy_delay_us <= 1000000,
              "test_copy_delay_us must be in [0, 1000000] (microseconds), got ", copy_delay_us);
  backend_->set_test_copy_delay_us(copy_delay_us);
  hooks_ = hooks;
}

}  // namespace moe_swap::streaming
